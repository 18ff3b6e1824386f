"""The LLaVASeg method's shared pipeline, used by its routes, the feature cache and training alike.

* :mod:`~llavaseg.method.stages`: the two chain-of-thought turns of the frozen MLLM (or the ground-truth
  stages that replace them for the oracle and for training on annotations);
* :mod:`~llavaseg.method.segment`: the phrases the text encoder embeds, and the adapters -> frozen SAM
  decoder step that turns them into mask logits (differentiable in the adapters only).
"""
