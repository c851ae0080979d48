"""Generated code of kubellm.v1 (python -m kubellm.protos.generate); do not edit."""
