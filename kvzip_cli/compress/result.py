"""What `kvc compress` reports of a file it wrote."""

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class CompressResult:
    output: str
    model: str
    tokens: int
    kept_ratio: float
    raw_bytes: int  # what the model's own cache holds of the context in fp16 (sliding windows: their window only)
    file_bytes: int
    compression: float
    seconds: float
    prefill_seconds: float
    codec: str
    bits: int
    scorer: str | None = None  # None when nothing was pruned
    allocation: str | None = None
    score_seconds: float = 0.0
    key_bits: int | None = None  # quantized files: the keys' precision (may differ from `bits`, the values')
    calibration: dict | None = None  # --target-top1 / --target-kld: the search's outcome (kvzip_cli.compress.calibrate)
    estimate: dict | None = None  # the header's loss estimate (kvzip_cli.evaluation.estimate), if one was made

    @property
    def bits_per_element(self) -> float:
        """File bits per kept K or V scalar (fp16 storage is 16)."""
        return 8 * self.file_bytes / (self.raw_bytes / 2 * self.kept_ratio)

    def as_json(self) -> dict:
        return {**asdict(self), "bits_per_element": self.bits_per_element}
