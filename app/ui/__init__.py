"""The pages served by the server itself: the model debug page and the usage reports (views.py), the debug API's
wire format (trace.py), and their HTML, CSS and JavaScript (static/)."""
