"""The training engine: pure PyTorch, no Django import anywhere below this package.

Public API (kept stable for the platform and outside benchmarks):

- ``workers.engine.spec.Spec``: the one configuration schema (``Spec.model_validate(dict)``).
- ``workers.engine.model.build_model(spec)``: a ``torch.nn.Module`` whose ``forward(input_ids, labels=None)``
  returns an object with ``.loss`` and ``.logits``.
- ``workers.engine.estimate.count_parameters(spec)``: the exact parameter count, without building the model.
"""
