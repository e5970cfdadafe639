"""What the CLI's inspection commands compute: inspect, diff, export, report, and the model
factory that builds a user's model on explicit opt-in."""
