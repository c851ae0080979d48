"""The Kubernetes operator (LLMDeployment CRD, builders, kopf handlers). Never imports torch."""
