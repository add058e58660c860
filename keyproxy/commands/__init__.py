"""The `keyproxy` command line: serve, check, keygen, explain, replay and the demo."""
