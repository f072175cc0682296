"""model.summary(): the Keras table of layers, output shapes and parameter counts."""

_WIDTHS = (29, 26, 12)          # Layer (type) | Output Shape | Param #


def _row(cells):
    return " " + "".join(str(cell).ljust(width) for cell, width in zip(cells, _WIDTHS)).rstrip()


def summary_table(model):
    line, double = "_" * sum(_WIDTHS), "=" * sum(_WIDTHS)
    rows = [f'Model: "{model.name}"', line, _row(("Layer (type)", "Output Shape", "Param #")),
            double]
    for index, layer in enumerate(model.layers):
        count = layer.count_params() + sum(v.size for v in layer.state.values())
        rows.append(_row((f"{layer.name} ({type(layer).__name__})",
                          str((None, *layer.output_shape)), f"{count:,}")))
        rows.append(line if index < len(model.layers) - 1 else double)
    trainable = sum(p.size for p in model.params.values())
    total = model.count_params()
    rows += [f"Total params: {total:,} ({total * 4 / 2**20:.2f} MB)",
             f"Trainable params: {trainable:,}",
             f"Non-trainable params: {total - trainable:,}", line]
    return "\n".join(rows)
