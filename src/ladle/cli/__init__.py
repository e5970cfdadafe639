"""The `ladle` command line; each command lives in its own module and registers on `app`."""
