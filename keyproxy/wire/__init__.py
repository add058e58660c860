"""The wire: client connections, exchanges, the upstream pool and the listeners."""
