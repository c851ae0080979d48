"""The `LLMDeployment` API types (kubellm.io/v1alpha1), shared by the operator, `kubellm serve -f` and local
deployments. Pydantic only: no torch, no Kubernetes client."""
