"""The per-layer report of a quantized model file: python -m gpfq.io.describe FILE.safetensors"""
import sys

from gpfq.io.model_file import QuantizedFileError, read_quantized


def describe(path) -> str:
    """The per-layer report of a quantized model file, as a table: levels, stored bits, entropy, bytes."""
    quantized = read_quantized(path)
    lines = [f"{'weight':40s} {'shape':>18s} {'levels':>6s} {'granularity':>11s} {'stored bits':>11s} "
             f"{'entropy':>7s} {'bytes':>9s} {'float bytes':>11s}"]
    for key, e in quantized.header["coded"].items():
        lines.append(f"{key:40s} {str(tuple(e['shape'])):>18s} {e['levels']:6d} {e['granularity']:>11s} "
                     f"{e['stored_bits']:11d} {e['entropy']:7.3f} {e.get('bytes', 0):9d} {e.get('float_bytes', 0):11d}")
    size = quantized.size_report()
    lines.append(f"{len(quantized.codes)} coded weights ({size.quantized_weights} values): {size.levels} levels, "
                 f"{size.stored_bits:.3f} stored bits and {size.entropy:.3f} bits of entropy per weight; file "
                 f"{size.file_bytes} bytes, {size.ratio:.3f} of the float tensors' {size.float_bytes}")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m gpfq.io.describe FILE.safetensors", file=sys.stderr)
        return 2
    try:
        print(describe(argv[0]))
    except (QuantizedFileError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
