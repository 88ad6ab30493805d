"""taskd: a multi-user task service with live updates."""
