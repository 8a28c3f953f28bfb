"""torch.ao.quantization's flows: eager, FX and dynamic (deprecated upstream, still what many
models ship with), their qconfig building, kernel support table and live layer rebuild."""
