"""gRPC servicers: translate protocol messages to engine calls and engine errors to status codes."""
