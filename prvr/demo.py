"""The embedded demo: a small synthetic PRVR dataset and tiny RANDOM-WEIGHT models.

:func:`make_demo_dataset` renders, deterministically from a seed, short videos of procedural
scenes: a textured background on which 2-5 distinct *events* happen one after the other (a
coloured shape moving, growing, shrinking or blinking), separated by short quiet gaps. Each
event gets one caption ("the red circle slides left"), written in the MS-SL caption format,
so every query describes only part of its video (partial relevance). The ground-truth moment
of every caption is kept in ``moments.tsv`` (never used for training).

Events are made to be separable from raw pixels: within a video every event has its own
colour (saturated, on a muted background), and shapes/motions vary; captions share one small
vocabulary across all videos, so a text model can tie words to visual content, and no caption
names its video.

:func:`make_demo_models` writes tiny random-init models in the same on-disk formats as real
weights (an open_clip ``local-dir`` folder, a transformers RoBERTa folder with a byte-level
BPE tokenizer trained in-process), each marked with ``DEMO_RANDOM_WEIGHTS.txt``. They load
through the same code paths as real weights. Two closed-form calibrations on frames rendered
by this module (:func:`calibration_frames`, drawn independently of any demo dataset) stand in
for pretraining, and nothing else is fitted:

* every image tower's output is centred (its final LayerNorm bias is shifted): random ViT
  features of these frames share one dominant direction (mean pairwise cosine 0.96), which
  hides the events from any cosine-based model;
* the CLIP *teacher*'s text projection is fitted (ridge regression) so that every demo caption
  phrasing points at the mean image feature of frames showing its colour and shape. Without
  this the teacher is a random text tower facing a random image tower: its scores are at
  chance, the distillation terms carry no information, and the student (random-init, hard
  negatives from epoch 0) collapses to scores that ignore the query (measured: triplet loss
  stuck at 2 x margin, test SumR at chance). With it the teacher ranks above chance and the
  student learns from it, as DL-DKD++ intends.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from prvr.atomic import replace_dir
from prvr.data.captions import Caption, write_captions

log = logging.getLogger(__name__)

DEMO_NAME = "demo"
WIDTH, HEIGHT = 96, 72  # even sizes (yuv420p)
FPS = 8
MIN_SECONDS, MAX_SECONDS = 8, 16
MIN_EVENTS, MAX_EVENTS = 2, 5
SPLIT_FRACTIONS = (0.6, 0.2, 0.2)  # train / val / test, by video
GENERATOR_VERSION = 2  # 2: dark backgrounds

# Saturated object colours (RGB); backgrounds are muted greys, so colour dominates the pixels.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (40, 200, 60),
    "blue": (45, 80, 235),
    "yellow": (240, 220, 40),
    "purple": (160, 55, 210),
    "orange": (250, 140, 25),
    "white": (250, 250, 250),
}
SHAPES = ("circle", "square", "triangle")
ACTIONS = ("moves left", "moves right", "moves up", "moves down", "grows", "shrinks", "blinks")
BACKGROUNDS = ("striped", "checkered", "cloudy", "dotted")
# Shapes are large and backgrounds dark and low-contrast so that the events, not the
# backgrounds, dominate global frame features. A random ViT LayerNorms every patch embedding,
# so a background close to CLIP's mean pixel (grey ~115) has its faint texture blown up to full
# scale: with grey 90-120 backgrounds, the video (= its background) explained 85 % of the
# variance of the demo student ViT's frame features and the event colour 7.5 %. With dark
# backgrounds (grey 30-50): colour 48-63 %, video 17-20 %; a linear probe finds the colour of
# held-out videos' frames 91 % of the time (chance 19 %), the shape 62 % (chance 34 %).
BASE_RADIUS = 18.0  # shape "radius" (pixels) for moves and blinks
MIN_RADIUS, MAX_RADIUS = 7.0, 28.0  # grows / shrinks between these
BG_BASE = (30.0, 50.0)  # background grey level range (per video)
BG_TINT = 5.0  # +- per channel
BG_CONTRAST = (4.0, 8.0)  # texture amplitude range

# Caption phrasings per action ({s} = "<colour> <shape>").
TEMPLATES: dict[str, tuple[str, ...]] = {
    "moves left": ("{a} {s} moves to the left", "{a} {s} slides left", "{a} {s} travels from right to left"),
    "moves right": ("{a} {s} moves to the right", "{a} {s} slides right", "{a} {s} travels from left to right"),
    "moves up": ("{a} {s} moves up", "{a} {s} rises", "{a} {s} floats upward"),
    "moves down": ("{a} {s} moves down", "{a} {s} falls", "{a} {s} drops downward"),
    "grows": ("{a} {s} grows", "{a} {s} gets bigger", "{a} {s} expands"),
    "shrinks": ("{a} {s} shrinks", "{a} {s} gets smaller", "{a} {s} contracts"),
    "blinks": ("{a} {s} blinks", "{a} {s} flashes on and off", "{a} {s} flickers"),
}
BACKGROUND_SUFFIX = "on a {b} background"
P_BACKGROUND_SUFFIX = 0.3


@dataclass(frozen=True)
class Event:
    """One event of a demo video: frames ``[start_frame, end_frame)``."""

    colour: str
    shape: str
    action: str
    start_frame: int
    end_frame: int
    cx: float  # centre (pixels) for static actions; start of the path for moves
    cy: float
    caption: str


@dataclass(frozen=True)
class DemoVideo:
    video_id: str
    n_frames: int
    background: str
    events: tuple[Event, ...]

    @property
    def duration(self) -> float:
        return self.n_frames / FPS


# --------------------------------------------------------------------------------------------
# Scene description (pure functions of a seed)


def _video_rng(seed: int, index: int) -> np.random.Generator:
    # Video i depends on (seed, i) only, not on n_videos.
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index), 0x5EED]))


def _caption(rng: np.random.Generator, colour: str, shape: str, action: str, background: str) -> str:
    template = TEMPLATES[action][int(rng.integers(len(TEMPLATES[action])))]
    text = template.format(a=("a", "the")[int(rng.integers(2))], s=f"{colour} {shape}")
    if rng.random() < P_BACKGROUND_SUFFIX:
        text += " " + BACKGROUND_SUFFIX.format(b=background)
    return text


def describe_video(seed: int, index: int) -> DemoVideo:
    """The scene description (timeline, events, captions) of demo video ``index``."""
    rng = _video_rng(seed, index)
    seconds = int(rng.integers(MIN_SECONDS, MAX_SECONDS + 1))
    n_frames = seconds * FPS
    n_events = int(rng.integers(MIN_EVENTS, MAX_EVENTS + 1))
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    colours = [list(COLOURS)[int(k)] for k in rng.permutation(len(COLOURS))[:n_events]]
    bounds = [round(i * n_frames / n_events) for i in range(n_events + 1)]
    events = []
    for k in range(n_events):
        slot0, slot1 = bounds[k], bounds[k + 1]
        slot = slot1 - slot0
        length = int(rng.integers(int(np.ceil(0.6 * slot)), slot + 1))
        start = slot0 + int(rng.integers(0, slot - length + 1))
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        action = ACTIONS[int(rng.integers(len(ACTIONS)))]
        cx = float(rng.uniform(0.3, 0.7) * WIDTH)
        cy = float(rng.uniform(0.3, 0.7) * HEIGHT)
        events.append(
            Event(
                colours[k],
                shape,
                action,
                start,
                start + length,
                cx,
                cy,
                _caption(rng, colours[k], shape, action, background),
            )
        )
    return DemoVideo(f"{DEMO_NAME}{index:04d}", n_frames, background, tuple(events))


# --------------------------------------------------------------------------------------------
# Rendering


def _background(kind: str, rng: np.random.Generator) -> np.ndarray:
    """A muted textured background, shape (HEIGHT, WIDTH, 3) uint8."""
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float64)
    base = rng.uniform(*BG_BASE)
    tint = rng.uniform(-BG_TINT, BG_TINT, size=3)
    contrast = rng.uniform(*BG_CONTRAST)
    if kind == "striped":
        theta = rng.uniform(0, np.pi)
        period = rng.uniform(8, 16)
        pattern = np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period)
    elif kind == "checkered":
        cell = int(rng.integers(8, 17))
        pattern = (((xx // cell) + (yy // cell)) % 2) * 2.0 - 1.0
    elif kind == "cloudy":
        coarse = rng.uniform(-1, 1, size=(HEIGHT // 12 + 2, WIDTH // 12 + 2))
        gy, gx = yy / 12.0, xx / 12.0
        y0, x0 = gy.astype(int), gx.astype(int)
        fy, fx = gy - y0, gx - x0
        pattern = (
            coarse[y0, x0] * (1 - fy) * (1 - fx)
            + coarse[y0 + 1, x0] * fy * (1 - fx)
            + coarse[y0, x0 + 1] * (1 - fy) * fx
            + coarse[y0 + 1, x0 + 1] * fy * fx
        )
    elif kind == "dotted":
        step = int(rng.integers(8, 13))
        d = np.hypot((xx % step) - step / 2, (yy % step) - step / 2)
        pattern = np.where(d < step / 5, 1.0, -0.3)
    else:  # pragma: no cover - BACKGROUNDS is closed
        raise ValueError(f"unknown background {kind!r}")
    img = base + tint[None, None, :] + contrast * pattern[..., None]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _shape_mask(shape: str, cx: float, cy: float, r: float, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        h = 0.85 * r
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if shape == "triangle":  # pointing up: apex (0, -r), base corners (+-0.87 r, r/2)
        return (dy <= r / 2) & (np.sqrt(3.0) * dx - dy <= r) & (-np.sqrt(3.0) * dx - dy <= r)
    raise ValueError(f"unknown shape {shape!r}")


def _event_pose(ev: Event, frame: int) -> tuple[float, float, float, bool]:
    """Centre, radius and visibility of the event's shape at ``frame``."""
    n = ev.end_frame - ev.start_frame
    u = (frame - ev.start_frame) / max(n - 1, 1)  # 0 -> 1 over the event
    cx, cy, r, visible = ev.cx, ev.cy, BASE_RADIUS, True
    lo_x, hi_x = 0.18 * WIDTH, 0.82 * WIDTH
    lo_y, hi_y = 0.2 * HEIGHT, 0.8 * HEIGHT
    if ev.action == "moves left":
        cx = hi_x + (lo_x - hi_x) * u
    elif ev.action == "moves right":
        cx = lo_x + (hi_x - lo_x) * u
    elif ev.action == "moves up":
        cy = hi_y + (lo_y - hi_y) * u
    elif ev.action == "moves down":
        cy = lo_y + (hi_y - lo_y) * u
    elif ev.action == "grows":
        r = MIN_RADIUS + (MAX_RADIUS - MIN_RADIUS) * u
    elif ev.action == "shrinks":
        r = MAX_RADIUS + (MIN_RADIUS - MAX_RADIUS) * u
    elif ev.action == "blinks":
        visible = ((frame - ev.start_frame) // 2) % 2 == 0  # 2 frames on, 2 off (2 Hz at 8 fps)
    return cx, cy, r, visible


def render_video(video: DemoVideo, seed: int, index: int) -> np.ndarray:
    """All frames of a demo video, shape (n_frames, HEIGHT, WIDTH, 3) uint8 RGB."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(index), 0xB6]))
    bg = _background(video.background, rng)
    frames = np.repeat(bg[None], video.n_frames, axis=0)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float64)
    for ev in video.events:
        colour = np.asarray(COLOURS[ev.colour], dtype=np.uint8)
        for f in range(ev.start_frame, ev.end_frame):
            cx, cy, r, visible = _event_pose(ev, f)
            if visible:
                frames[f][_shape_mask(ev.shape, cx, cy, r, yy, xx)] = colour
    return frames


def encode_mp4(path: str | os.PathLike, frames: np.ndarray, fps: int = FPS) -> None:
    """Encode RGB frames (T, H, W, 3) uint8 to H.264 MP4 with PyAV (deterministic settings).

    x264's macroblock-tree rate control is switched off: with it, re-encoding the same frames
    of these tiny videos gave different bytes (and decoded pixels) now and then, even with one
    thread (measured: video 3 of seed 3 differed in 4 of 6 encodes in one process).
    """
    import av

    _, h, w, _ = frames.shape
    options = {"crf": "18", "preset": "medium", "g": str(2 * fps), "threads": "1", "x264-params": "mbtree=0"}
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps, options=options)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.thread_count = 1
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


# --------------------------------------------------------------------------------------------
# Dataset


def split_videos(video_ids: list[str], seed: int) -> dict[str, list[str]]:
    """Random ~60/20/20 split by video (each split non-empty; val and test disjoint)."""
    n = len(video_ids)
    if n < 3:
        raise ValueError(f"demo: n_videos must be >= 3 (one per split), got {n}")
    perm = np.random.default_rng(np.random.SeedSequence([int(seed), n, 0x5B1])).permutation(n)
    n_val = max(1, round(SPLIT_FRACTIONS[1] * n))
    n_test = max(1, round(SPLIT_FRACTIONS[2] * n))
    n_train = n - n_val - n_test
    if n_train < 1:
        n_train, n_val, n_test = 1, 1, n - 2
    parts = {
        "train": perm[:n_train],
        "val": perm[n_train : n_train + n_val],
        "test": perm[n_train + n_val :],
    }
    return {k: sorted(video_ids[i] for i in v) for k, v in parts.items()}


def caption_file_name(split: str) -> str:
    return f"{DEMO_NAME}{split}.caption.txt"


def make_demo_dataset(
    out_dir: str | os.PathLike,
    n_videos: int = 40,
    seed: int = 0,
    captions_dir: str | os.PathLike | None = None,
) -> dict:
    """Generate the demo dataset (deterministic from ``seed``).

    Writes ``out_dir/videos/<video_id>.mp4`` (96x72, 8 fps, 8-16 s, H.264),
    ``<captions_dir>/demo{train,val,test}.caption.txt`` (MS-SL format, one caption per event;
    ``captions_dir`` defaults to ``out_dir``), ``out_dir/moments.tsv`` (``cap_id video_id start
    end``, seconds, end exclusive) and ``out_dir/demo.json`` (the full scene descriptions).
    Everything is built in a temp folder and then moved into place.

    Args:
        out_dir: output folder (created).
        n_videos: number of videos (>= 3).
        seed: the seed; the same seed gives the same captions and the same decoded frames.
        captions_dir: where the caption files go (default ``out_dir``).

    Returns:
        dict with ``videos`` (folder), ``captions`` ({split: path}), ``moments``, ``manifest``,
        ``splits`` ({split: [video ids]}), ``n_videos``, ``n_captions``, ``seconds`` (wall time).
    """
    t0 = time.perf_counter()
    n_videos = int(n_videos)
    out_dir = Path(out_dir)
    cap_dir = Path(captions_dir) if captions_dir is not None else out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    cap_dir.mkdir(parents=True, exist_ok=True)
    videos = [describe_video(seed, i) for i in range(n_videos)]
    splits = split_videos([v.video_id for v in videos], seed)
    by_id = {v.video_id: v for v in videos}

    tmp = out_dir / f".demo-tmp-{uuid.uuid4().hex[:8]}"
    try:
        (tmp / "videos").mkdir(parents=True)
        for i, v in enumerate(videos):
            encode_mp4(tmp / "videos" / f"{v.video_id}.mp4", render_video(v, seed, i))
        caption_paths = {}
        for split, ids in splits.items():
            caps = [Caption(f"{vid}#enc#{k}", vid, ev.caption) for vid in ids for k, ev in enumerate(by_id[vid].events)]
            write_captions(tmp / caption_file_name(split), caps)
            caption_paths[split] = cap_dir / caption_file_name(split)
        with open(tmp / "moments.tsv", "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f, delimiter="\t", lineterminator="\n")
            w.writerow(["cap_id", "video_id", "start", "end"])
            for v in videos:
                for k, ev in enumerate(v.events):
                    w.writerow(
                        [f"{v.video_id}#enc#{k}", v.video_id, f"{ev.start_frame / FPS:g}", f"{ev.end_frame / FPS:g}"]
                    )
        manifest = {
            "generator": "prvr.demo",
            "version": GENERATOR_VERSION,
            "seed": int(seed),
            "n_videos": n_videos,
            "fps": FPS,
            "width": WIDTH,
            "height": HEIGHT,
            "splits": splits,
            "videos": [
                {
                    "video_id": v.video_id,
                    "n_frames": v.n_frames,
                    "duration": v.duration,
                    "background": v.background,
                    "events": [asdict(ev) for ev in v.events],
                }
                for v in videos
            ],
        }
        (tmp / "demo.json").write_text(json.dumps(manifest, indent=1) + "\n")

        # Move into place: each piece with one rename (videos folder: old one removed after).
        final_videos = out_dir / "videos"
        if final_videos.exists():
            old = out_dir / f".videos.old-{uuid.uuid4().hex[:8]}"
            os.replace(final_videos, old)
            os.replace(tmp / "videos", final_videos)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp / "videos", final_videos)
        for split in splits:
            os.replace(tmp / caption_file_name(split), caption_paths[split])
        os.replace(tmp / "moments.tsv", out_dir / "moments.tsv")
        os.replace(tmp / "demo.json", out_dir / "demo.json")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n_caps = sum(len(v.events) for v in videos)
    seconds = time.perf_counter() - t0
    log.info("demo dataset: %d videos, %d captions in %s (%.1f s)", n_videos, n_caps, out_dir, seconds)
    return {
        "videos": final_videos,
        "captions": caption_paths,
        "moments": out_dir / "moments.tsv",
        "manifest": out_dir / "demo.json",
        "splits": splits,
        "n_videos": n_videos,
        "n_captions": n_caps,
        "seconds": seconds,
    }


def read_moments(path: str | os.PathLike) -> dict[str, tuple[str, float, float]]:
    """``moments.tsv`` → {cap_id: (video_id, start, end)} (seconds)."""
    out = {}
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        for lineno, row in enumerate(reader, 2):
            try:
                out[row["cap_id"]] = (row["video_id"], float(row["start"]), float(row["end"]))
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{path}:{lineno}: bad moments row ({exc})") from None
    return out


# --------------------------------------------------------------------------------------------
# Models (tiny, random weights)

DEMO_WARNING = (
    "These are RANDOM-INIT demo weights generated by prvr.demo.make_demo_models (seed {seed}). "
    "They carry no pretrained semantics: results computed with them only show that the pipeline "
    "runs. Use real CLIP / RoBERTa weights for meaningful numbers.\n"
)
CALIBRATION_NOTE = (
    "Calibrated in closed form on frames rendered by prvr.demo.calibration_frames (seed {seed}): "
    "{what}. All other weights are random.\n"
)

CLIP_CONFIG = {
    "model_cfg": {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 64, "patch_size": 16, "width": 64, "head_width": 32, "layers": 2},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    },
    "preprocess_cfg": {"size": 64},
}
STUDENT_CLIP_CONFIG = {
    "model_cfg": {
        "embed_dim": 128,
        "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 128, "head_width": 32, "layers": 2},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
    },
    "preprocess_cfg": {"size": 64},
}
ROBERTA_CONFIG = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 130,  # RoBERTa positions start at pad_id + 1: 128 usable tokens
    "type_vocab_size": 1,
}
TOKENIZER_VOCAB = 1000
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # RoBERTa's ids 0..4

# Generic English for the demo tokenizer (written for this project), plus every demo phrasing.
GENERIC_TEXT = """\
A person walks into the room and sits down at the table. Two people talk in the kitchen while
the water boils. The man opens the door and looks outside; it is raining. A woman picks up a cup
of coffee and drinks it slowly. The children run across the field and play with a ball. The dog
jumps over the fence and chases the cat. Someone turns on the light and reads a book. The car
stops at the corner and a driver gets out. She puts the phone on the desk and starts to write.
He throws the ball to his friend, who catches it with one hand. The camera shows a crowd in a
large hall; people clap and cheer. A cook cuts the vegetables and adds them to the pan. The
band plays music on a small stage. They climb the stairs and enter an old building. The boy
rides a bike down the street. A girl paints a picture of the sea. The sun sets behind the hills
and the sky turns orange. Later, the group walks back home through the park. An object appears
in the middle of the screen, moves quickly and then disappears. Shapes and colours change over
time. The picture gets brighter, then darker. Something small becomes large; something large
becomes small. Then it is gone.
"""


def demo_vocabulary_texts() -> list[str]:
    """Every caption phrasing the demo can produce, plus generic English sentences."""
    texts = [line.strip() for line in GENERIC_TEXT.replace(". ", ".\n").splitlines() if line.strip()]
    for action, templates in TEMPLATES.items():
        for t in templates:
            for colour in COLOURS:
                for shape in SHAPES:
                    for a in ("a", "the"):
                        texts.append(t.format(a=a, s=f"{colour} {shape}"))
    texts += [BACKGROUND_SUFFIX.format(b=b) for b in BACKGROUNDS]
    return texts


def _new_dir(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    return tmp


def _commit_dir(tmp: Path, final: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    for f in tmp.iterdir():  # safetensors writes 0600 files; give them the usual permissions
        f.chmod(0o666 & ~umask)
    replace_dir(tmp, final)


def _input_dependent_visual(model) -> None:
    """Zero the image tower's class and position embeddings; initialise the text projection.

    A random-init ViT's pooled output is dominated by its input-independent part (class token +
    positions): measured on demo frames, the mean cosine between any two frames' features is
    ~0.95, so every video looks alike. Without those embeddings the tower is a random
    attention-pooled projection of the patches (mean cosine ~0.5): still random weights, but
    features that follow the pixels. open_clip allocates ``text_projection`` with torch.empty and
    (for these configs) leaves it uninitialised: it is drawn here so the demo is deterministic.
    """
    import torch

    visual = model.visual
    with torch.no_grad():
        for name in ("class_embedding", "positional_embedding"):
            if getattr(visual, name, None) is not None:
                getattr(visual, name).zero_()
        proj = getattr(model, "text_projection", None)
        if isinstance(proj, torch.Tensor):
            proj.normal_(std=proj.shape[0] ** -0.5)


CALIBRATION_REPEATS = 4  # calibration clips per (colour, shape) pair
CALIBRATION_EVENT_FRAMES = 16  # frames of a calibration clip's event (then 4 background-only frames)
TEXT_FIT_RIDGE = 1e-2  # ridge strength of the teacher's text projection, relative to mean ||h||^2


def colour_shape_pairs() -> list[tuple[str, str]]:
    """Every (colour, shape) pair, in the label order of :func:`calibration_frames`."""
    return [(c, s) for c in COLOURS for s in SHAPES]


def calibration_frames(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Frames on which the demo models are calibrated, independent of any demo dataset.

    For every (colour, shape) pair, :data:`CALIBRATION_REPEATS` short clips (random action,
    position and background) are rendered as :func:`render_video` renders demo videos; from
    each clip 4 frames of the event (all visible, blinks included) and 1 background-only frame
    are kept, so about a fifth of the frames show no event, as in the demo videos.

    Returns:
        frames (N, HEIGHT, WIDTH, 3) uint8 RGB and labels (N,) int64: the index of the frame's
        pair in :func:`colour_shape_pairs`, -1 for background-only frames. N = 5 x 4 x 21 = 420.
    """
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xCA1B]))
    n = CALIBRATION_EVENT_FRAMES
    frames, labels = [], []
    for _ in range(CALIBRATION_REPEATS):
        for k, (colour, shape) in enumerate(colour_shape_pairs()):
            action = ACTIONS[int(rng.integers(len(ACTIONS)))]
            cx, cy = float(rng.uniform(0.3, 0.7) * WIDTH), float(rng.uniform(0.3, 0.7) * HEIGHT)
            background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
            clip = DemoVideo("calibration", n + 4, background, (Event(colour, shape, action, 0, n, cx, cy, ""),))
            rendered = render_video(clip, int(rng.integers(2**31)), k)
            for f in range(0, n, 4):  # blinks show frames 0-1, 4-5, ...
                frames.append(rendered[f])
                labels.append(k)
            frames.append(rendered[n + 2])
            labels.append(-1)
    return np.stack(frames), np.asarray(labels, dtype=np.int64)


def _encode_frames(model, preprocess, frames: np.ndarray):
    """(N, H, W, 3) uint8 → (pre-projection pooled features (N, width), outputs (N, embed))."""
    import torch
    from PIL import Image

    visual = model.visual
    if getattr(visual, "pool_type", "tok") != "tok" or getattr(visual, "attn_pool", None) is not None:
        raise ValueError("demo calibration expects a class-token ViT (pool_type 'tok', no attention pooling)")
    x = torch.stack([preprocess(Image.fromarray(f)) for f in frames])
    seen = {}
    hook = visual.ln_post.register_forward_hook(lambda mod, inp, out: seen.__setitem__("x", out))
    try:
        with torch.no_grad():
            out = model.encode_image(x)
    finally:
        hook.remove()
    pooled = seen["x"][:, 0] if seen["x"].dim() == 3 else seen["x"]
    return pooled, out


def _mean_cosine(x) -> float:
    import torch

    x = torch.nn.functional.normalize(x, dim=-1)
    return float((x @ x.T).mean())


def _centre_image_features(model, preprocess, frames: np.ndarray):
    """Shift ``visual.ln_post.bias`` so that the image features of ``frames`` have zero mean.

    The pooled class token goes through ``ln_post`` and then the linear ``proj``: subtracting
    the mean pooled vector from the LayerNorm bias centres the outputs exactly (on these frames).

    Returns:
        (outputs after centring (N, embed), mean pairwise cosine before, after).
    """
    import torch

    pooled, before = _encode_frames(model, preprocess, frames)
    shift = pooled.mean(0)
    with torch.no_grad():
        model.visual.ln_post.bias -= shift
        after = before - shift @ model.visual.proj  # = encode_image with the new bias
    return after, _mean_cosine(before), _mean_cosine(after)


def demo_phrasings() -> tuple[list[str], list[int]]:
    """Caption phrasings of the demo and their pair index (in :func:`colour_shape_pairs`).

    Every template, colour, shape and article, each without and with a background suffix (the
    background cycling over the pairs): 1764 texts.
    """
    texts, pairs = [], []
    n = 0
    for templates in TEMPLATES.values():
        for template in templates:
            for k, (colour, shape) in enumerate(colour_shape_pairs()):
                suffix = " " + BACKGROUND_SUFFIX.format(b=BACKGROUNDS[n % len(BACKGROUNDS)])
                n += 1
                for a in ("a", "the"):
                    for end in ("", suffix):
                        texts.append(template.format(a=a, s=f"{colour} {shape}") + end)
                        pairs.append(k)
    return texts, pairs


def _fit_text_projection(model, tokenizer, image_features, labels: np.ndarray) -> float:
    """Ridge-fit ``model.text_projection`` so that each demo phrasing maps to its pair's mean image feature.

    Args:
        image_features: (N, embed) centred image features of the calibration frames.
        labels: (N,) pair index per frame (-1: background only).

    Returns:
        Mean cosine between fitted text features and their targets, over all phrasings.
    """
    import torch

    proj = model.text_projection
    if not isinstance(proj, torch.nn.Parameter) or proj.dim() != 2:
        raise ValueError("demo calibration expects a text_projection matrix (width, embed)")
    labels_t = torch.from_numpy(labels)
    targets = torch.stack([image_features[labels_t == k].mean(0) for k in range(len(colour_shape_pairs()))])
    texts, pairs = demo_phrasings()
    y = targets[torch.tensor(pairs)]
    width = proj.shape[0]
    with torch.no_grad():
        fitted = proj.data
        proj.data = torch.eye(width, dtype=fitted.dtype)  # encode_text then returns pre-projection features
        h = torch.cat([model.encode_text(tokenizer(texts[i : i + 1024])) for i in range(0, len(texts), 1024)])
        lam = TEXT_FIT_RIDGE * h.pow(2).sum(1).mean()
        w = torch.linalg.solve(h.T @ h + lam * torch.eye(width, dtype=h.dtype), h.T @ y)
        proj.data = w.to(fitted.dtype).contiguous()
    return float(torch.nn.functional.cosine_similarity(h @ w, y, dim=-1).mean())


def _make_clip_dir(final: Path, config: dict, seed: int, fit_text: bool = False) -> dict:
    """An open_clip ``local-dir`` folder with random weights, calibrated on demo frames.

    The image tower's class/position embeddings are zeroed and its output centred on
    :func:`calibration_frames` (seed ``seed``); with ``fit_text`` (the teacher) its text
    projection is also fitted to the demo phrasings (see the module docstring).
    """
    import open_clip
    import torch
    from safetensors.torch import save_file

    tmp = _new_dir(final)
    try:
        (tmp / "open_clip_config.json").write_text(json.dumps(config, indent=1) + "\n")
        torch.manual_seed(seed)
        model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp}", pretrained=None)
        model.eval()
        _input_dependent_visual(model)
        frames, labels = calibration_frames(seed)
        features, cos_before, cos_after = _centre_image_features(model, preprocess, frames)
        calibration = {"frames": len(frames), "mean_cosine_before": cos_before, "mean_cosine_after": cos_after}
        what = "image features centred (final LayerNorm bias)"
        if fit_text:
            tokenizer = open_clip.get_tokenizer(f"local-dir:{tmp}")
            calibration["text_fit_cosine"] = _fit_text_projection(model, tokenizer, features, labels)
            what += "; text projection fitted (ridge) to the mean image feature of each caption's colour and shape"
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "open_clip_model.safetensors"))
        (tmp / "DEMO_RANDOM_WEIGHTS.txt").write_text(
            DEMO_WARNING.format(seed=seed) + CALIBRATION_NOTE.format(seed=seed, what=what)
        )
        n_params = sum(p.numel() for p in model.parameters())
        _commit_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("demo clip model %s: calibration %s", final, calibration)
    return {"path": final, "params": n_params, "embed_dim": config["model_cfg"]["embed_dim"],
            "calibration": calibration}


def train_demo_tokenizer(vocab_size: int = TOKENIZER_VOCAB):
    """A byte-level BPE trained in-process on the demo vocabulary, wrapped as a RoBERTa tokenizer."""
    from tokenizers import ByteLevelBPETokenizer, processors
    from transformers import RobertaTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        demo_vocabulary_texts(),
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
    )
    backend = bpe._tokenizer
    backend.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    return RobertaTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        sep_token="</s>",
        cls_token="<s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
        model_max_length=ROBERTA_CONFIG["max_position_embeddings"] - 2,
    )


def _make_roberta_dir(final: Path, seed: int) -> dict:
    import torch
    from transformers import RobertaConfig, RobertaModel

    tmp = _new_dir(final)
    try:
        tokenizer = train_demo_tokenizer()
        for name, i in zip(SPECIAL_TOKENS, range(len(SPECIAL_TOKENS))):
            assert tokenizer.convert_tokens_to_ids(name) == i, name
        tokenizer.save_pretrained(str(tmp))
        config = RobertaConfig(
            vocab_size=len(tokenizer), pad_token_id=1, bos_token_id=0, eos_token_id=2, **ROBERTA_CONFIG
        )
        torch.manual_seed(seed)
        model = RobertaModel(config, add_pooling_layer=False)
        model.save_pretrained(str(tmp))
        (tmp / "DEMO_RANDOM_WEIGHTS.txt").write_text(DEMO_WARNING.format(seed=seed))
        n_params = sum(p.numel() for p in model.parameters())
        _commit_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"path": final, "params": n_params, "hidden": ROBERTA_CONFIG["hidden_size"], "vocab": len(tokenizer)}


def make_demo_models(out_dir: str | os.PathLike, seed: int = 0) -> dict:
    """Write the demo's tiny RANDOM-WEIGHT models (each folder marked ``DEMO_RANDOM_WEIGHTS.txt``).

    * ``out_dir/clip``: the teacher, an open_clip ``local-dir`` folder (ViT, embed 64,
      64 px / patch 16 / width 64 / 2 layers; text width 64 / 2 layers);
    * ``out_dir/student_clip``: a second, different open_clip model for the student's frame
      features (embed 128, 64 px / patch 8 / width 128 / 2 layers);
    * ``out_dir/roberta``: a transformers RoBERTa (hidden 64, 2 layers, 2 heads) with a
      byte-level BPE tokenizer trained in-process on the demo vocabulary.

    Both image towers have their output centred on :func:`calibration_frames`, and the
    teacher's text projection is fitted to the demo phrasings (module docstring); the
    ``calibration`` entry of each CLIP result reports the measured effect.

    Load them with ``load_clip("local-dir:<out_dir>/clip")`` and
    :func:`prvr.encoders.text.load_text_encoder` — the same code paths as real weights.

    Returns:
        dict {"clip": {...}, "student_clip": {...}, "roberta": {...}, "seconds": float}, each
        entry with ``path`` and ``params`` (CLIP entries also ``calibration``).
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out = {
        "clip": _make_clip_dir(out_dir / "clip", CLIP_CONFIG, seed, fit_text=True),
        "student_clip": _make_clip_dir(out_dir / "student_clip", STUDENT_CLIP_CONFIG, seed + 1),
        "roberta": _make_roberta_dir(out_dir / "roberta", seed + 2),
    }
    out["seconds"] = time.perf_counter() - t0
    log.warning(
        "!!! demo models in %s use RANDOM weights (seed %d): results only show that the pipeline runs !!!",
        out_dir,
        seed,
    )
    return out
