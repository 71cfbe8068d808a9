"""Reference implementations the tests compare against (PyTorch), importable as `tests.reference`
by the tests and the benches alike."""
