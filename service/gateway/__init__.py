"""The HTTP gateway: app assembly, routers per feature, the studio's static files."""
