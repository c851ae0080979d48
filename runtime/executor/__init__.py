"""The executor: runs a step's batch on the model, on one rank or a tensor × pipeline-parallel group.
Model code, weight loading, parallel layers, pipeline stages and CUDA graphs live here."""
