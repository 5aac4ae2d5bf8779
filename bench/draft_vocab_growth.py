"""Time how long the draft's sub-vocabulary output layer takes to admit a new token, on one CPU core.

A token outside the draft's output layer joins it when a prompt or a committed
token brings it, on the critical path of the request's next draft. Two ways
are timed for one token at a time: rebuilding and requantizing the whole layer
(``VocabSubset.install``, which the service does only once the side layer is
full) and adding the token to the side layer (``VocabSubset.add``, the service's
path). The draft is Qwen2.5-Coder-0.5B by default, int8 as the service runs it.

Writes ``bench/results/<name>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from bench.run_bench import command_line, write_results

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.draft_vocab_growth", description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="draft-vocab-growth", help="result file name")
    parser.add_argument("--tokens", type=int, default=5, help="tokens added one at a time per method")
    args = parser.parse_args(argv)

    import warnings

    import torch
    from transformers import AutoTokenizer

    from bench.run_bench import machine_description
    from services.draft.vocab import VocabSubset, special_token_ids
    from services.launcher import default_cpu_split
    from shared.config import Settings
    from shared.modeling import load_causal_lm, place_process

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    settings = Settings()
    _, draft_cpus = default_cpu_split()
    device = place_process("cpu", 1, draft_cpus)
    tokenizer = AutoTokenizer.from_pretrained(settings.draft_model)
    model = load_causal_lm(settings.draft_model, "float32", device)
    vocab = VocabSubset(model, settings.draft_vocab_size, special_token_ids(tokenizer, model), quantize=True)

    new_tokens = [token for token in range(settings.draft_vocab_size, vocab.vocab_size) if token not in vocab.known]
    rebuild_ms, side_ms = [], []
    for token in new_tokens[: args.tokens]:
        vocab.known.add(token)
        started = time.perf_counter()
        vocab.install(model)
        rebuild_ms.append(1000 * (time.perf_counter() - started))
    for token in new_tokens[args.tokens : 2 * args.tokens]:
        started = time.perf_counter()
        vocab.add(model, [token])
        side_ms.append(1000 * (time.perf_counter() - started))

    command = command_line("bench.draft_vocab_growth", argv)
    results = {"rebuild the int8 layer": rebuild_ms, "add to the side layer": side_ms}
    lines = [
        "# Time for the draft's output layer to admit a new token",
        "",
        f"- command: `{command.strip()}`",
        f"- machine: {machine_description()}; on CPU {draft_cpus or 'any'}, one torch thread",
        f"- draft: `{settings.draft_model}`, int8 output layer over {settings.draft_vocab_size} ids plus the special tokens",
        "",
        "| method | median ms per token | max ms | tokens |",
        "|---|---|---|---|",
    ]
    for method, times in results.items():
        lines.append(f"| {method} | {statistics.median(times):.1f} | {max(times):.1f} | {len(times)} |")
    write_results(ROOT / "bench" / "results", args.name, {"command": command, "ms_per_token": results}, "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
