"""The server's routes by endpoint family; each module's `add_routes(app, state)` attaches its own."""
