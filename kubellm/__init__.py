"""kubellm: serve large language models on Kubernetes.

`import kubellm` stays light (no torch): the runtime entry points are loaded on first use,
so the operator image can import `kubellm.operator` without the runtime extras.
"""

__version__ = "0.1.0"

_LAZY = {
    "pipeline": "kubellm.runtime.pipeline",
    "Pipeline": "kubellm.runtime.pipeline",
    "FollowerPipeline": "kubellm.runtime.pipeline",
    "Response": "kubellm.runtime.response",
    "GenerationConfig": "kubellm.runtime.config",
    "EngineConfig": "kubellm.runtime.config",
    # LMDeploy's configs, mapped onto EngineConfig and the chat template (docs/seeds.md)
    "TurbomindEngineConfig": "kubellm.runtime.lmdeploy_compat",
    "PytorchEngineConfig": "kubellm.runtime.lmdeploy_compat",
    "ChatTemplateConfig": "kubellm.runtime.chat_template",
    "serve": "kubellm.runtime.local.deployments",
    "client": "kubellm.runtime.local.deployments",
    "terminate_server": "kubellm.runtime.local.deployments",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kubellm' has no attribute {name!r}")
