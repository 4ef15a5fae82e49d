"""The `disttrain` command line."""
