"""The `kubellm` command."""
