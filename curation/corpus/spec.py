"""What to synthesize: datasets (name, kind, size, noise rates) and the corpus-wide settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from curation.corpus.noise import DEFAULT_INTERLEAVED_RATES, DEFAULT_PAIR_RATES, DEFAULT_VIDEO_RATES, NOISE_TYPES



@dataclass
class DatasetSpec:
    name: str
    kind: str  # pair | interleaved | video
    samples: int
    noise: dict[str, float] = field(default_factory=dict)
    samples_per_shard: int = 256

    def __post_init__(self) -> None:
        if self.kind not in NOISE_TYPES:
            raise ValueError(f"dataset {self.name!r}: unknown kind {self.kind!r}; expected one of {', '.join(NOISE_TYPES)}")
        if self.samples < 0 or self.samples_per_shard < 1:
            raise ValueError(f"dataset {self.name!r}: samples must be >= 0 and samples_per_shard >= 1")
        unknown = set(self.noise) - set(NOISE_TYPES[self.kind])
        if unknown:
            raise ValueError(
                f"dataset {self.name!r}: unknown noise type(s) {sorted(unknown)} for kind {self.kind!r}; "
                f"known: {', '.join(NOISE_TYPES[self.kind])}"
            )
        bad = {k: v for k, v in self.noise.items() if not 0 <= v <= 1}
        if bad or sum(self.noise.values()) > 1:
            raise ValueError(f"dataset {self.name!r}: noise rates must be in [0, 1] and sum to at most 1, got {self.noise}")

    @property
    def num_shards(self) -> int:
        return (self.samples + self.samples_per_shard - 1) // self.samples_per_shard


@dataclass
class SynthConfig:
    seed: int = 0
    datasets: list[DatasetSpec] = field(default_factory=list)
    image_min: int = 64  # side length range of clean images, in pixels
    image_max: int = 112
    video_size: int = 64
    video_frames: int = 8
    video_fps: int = 8

    @classmethod
    def preset(cls, size: str = "small", seed: int = 0, noise_scale: float = 1.0) -> "SynthConfig":
        """Named sizes: ``tiny`` (tests), ``small`` (demo), ``medium``, ``large``; or an integer
        string, the number of pairs in the main pair dataset (the rest scale with it)."""
        scales = {"tiny": 48, "small": 600, "medium": 6000, "large": 60000}
        if size in scales:
            n = scales[size]
        else:
            try:
                n = int(size)
            except ValueError:
                raise ValueError(f"unknown size {size!r}: use tiny, small, medium, large or a number of pairs") from None
            if n < 1:
                raise ValueError("size must be >= 1")
        per_shard = 24 if n <= 48 else 200 if n <= 1000 else 1000

        def scaled(rates: dict[str, float]) -> dict[str, float]:
            return {k: v * noise_scale for k, v in rates.items()}

        cc3m_rates = {k: v / 2 for k, v in DEFAULT_PAIR_RATES.items()}
        return cls(
            seed=seed,
            datasets=[
                DatasetSpec("coyo_synth", "pair", n, scaled(DEFAULT_PAIR_RATES), per_shard),
                DatasetSpec("cc3m_synth", "pair", max(1, n // 2), scaled(cc3m_rates), per_shard),
                DatasetSpec("mmc4_synth", "interleaved", max(1, n // 6), scaled(DEFAULT_INTERLEAVED_RATES), max(8, per_shard // 4)),
                DatasetSpec("video_synth", "video", max(1, n // 8), scaled(DEFAULT_VIDEO_RATES), max(8, per_shard // 4)),
            ],
        )
