"""What a written file lost, estimated without knowing any question: the self-check (kvzip_cli.evaluation.self_check)
of the file as `kvc load` reads it back, against the full cache it was made from. Recorded in the file's header as
`estimate`, so that inspect and load can show it (a calibrated file's is the self-check its search chose it by)."""

from pathlib import Path

from ..attention import kvc_attention_in
from ..errors import KvcError
from ..load.loader import load
from .self_check import SelfCheck


def estimate_loss(pre, path: Path) -> dict:
    """The header's `estimate` for the file at `path`, made from `pre` (kvzip_cli.compress.prefilled.Prefilled):
    top1 and kld of the file's next-token choices against the full cache's over the self-check's probes, and how
    many probes and positions they pool (the same figures for the same file: its time goes to the header's
    `timings`)."""
    check = SelfCheck(pre)
    if not check.probes:  # nothing to probe: the file says so rather than carry a figure of nothing
        return {"method": "self-check", "probes": 0, "top1": None, "kld": None, "positions": 0,
                "note": "no line of the document has more than 8 words to quote"}
    with kvc_attention_in(pre.lm.model):
        result = check.run(load(path, pre.lm).cache)
    return {**result.as_json(), "method": "self-check"}


def estimate_file(path: Path, text: str, lm) -> dict:
    """The loss estimate of an existing file (one made with --no-estimate, or before kvc recorded one), from the
    document it was made from: `text` is prefilled again in `lm` and must lay out to the very tokens the file holds."""
    from kvc_format import KvcReader

    from ..compress.prefilled import prefill_document
    from ..compress.settings import DEFAULT_CHUNK
    from ..load.loader import check_identity

    with KvcReader(path) as reader:
        header = reader.header
    check_identity(header, lm.model, lm.tokenizer)
    pre = prefill_document(text, lm, header.get("settings", {}).get("chunk_size") or DEFAULT_CHUNK)
    if list(pre.layout.prefix_ids) != list(header["prompt"]["prefix_ids"]):
        raise KvcError(f"{path} was not made from this document (its tokens differ): give the document it was "
                       "made from")
    return estimate_loss(pre, path)
