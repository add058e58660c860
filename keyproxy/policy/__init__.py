"""Pure rules the decision applies: paths, routes, allowlists, client addresses, credentials,
end-user tokens and permissions. No sockets, files or clocks: callers pass those in."""
