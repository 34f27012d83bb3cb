"""The bundled demo model's world: captioned pictures of simple shapes, and a checker that reads them.

`render(scene)` draws a 64x64 picture of one or two shapes on a plain background; `caption(scene, rng)`
words it in one of several templates; `read(image)` says which background, colour, shape, size and
position a picture shows. The checker is built from the renderer's geometry (colour segmentation and
shape measures), never from a generator's outputs, so it can score the demo model honestly.

Some colour-shape pairs and some caption wordings never appear in training (`HELD_OUT_PAIRS`,
`HELD_OUT_TEMPLATES`); the demo model is scored on them to measure generalisation, not recall.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64  # pixels, the demo checkpoint's native size
SUPERSAMPLE = 4  # drawn 4x larger then box-filtered: anti-aliased edges

PALETTE = {
    "red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (240, 220, 40), "green": (40, 170, 60),
    "blue": (40, 80, 220), "purple": (150, 60, 190), "white": (245, 245, 245), "black": (25, 25, 25),
    "gray": (128, 128, 128),
}
FOREGROUND_COLOURS = ("red", "orange", "yellow", "green", "blue", "purple")
BACKGROUND_COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 20, "large": 36}  # side of the shape's bounding box, pixels
POSITIONS = {"centre": (32, 32), "left": (19, 32), "right": (45, 32), "top": (32, 19), "bottom": (32, 45)}
JITTER = 3  # pixels a shape's centre may move from its named position

# Never shown in training, as one shape or as part of two: the model must compose them.
HELD_OUT_PAIRS = (("green", "triangle"), ("yellow", "circle"), ("purple", "square"))

SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
POSITION_WORDS = {
    "centre": ("in the centre", "in the center", "in the middle"),
    "left": ("on the left",), "right": ("on the right",), "top": ("at the top",), "bottom": ("at the bottom",),
}
COLOUR_WORDS = {colour: (colour,) for colour in PALETTE} | {"gray": ("gray", "grey")}

# {obj}: "a small red circle"; {pos}: "on the left"; {bg}: "blue". Empty parts collapse.
TRAIN_TEMPLATES = (
    "{obj} {pos} on a {bg} background",
    "{bg} background with {obj} {pos}",
    "a picture of {obj} {pos}, {bg} background",
    "{obj} on a {bg} background {pos}",
)
HELD_OUT_TEMPLATES = (
    "an image with a {bg} background and {obj} {pos}",
    "{obj} {pos} with a {bg} background",
)
NO_BACKGROUND_TEMPLATES = ("{obj} {pos}", "a picture of {obj} {pos}")
TWO_SHAPE_TEMPLATES = (
    "{obj} {pos} and {obj2} {pos2} on a {bg} background",
    "{bg} background with {obj} {pos} and {obj2} {pos2}",
)

# Words the tokenizer and text encoder know but no training caption ever uses: a fine-tune or a LoRA can
# teach them ("a red diamond") without touching the tokenizer. The renderer and the checker know the diamond
# (the demo LoRA teaches it); reserved colours cannot be taught by a transformer LoRA, as the demo VAE's
# decoder only draws the palette's colours (pink comes back purple: see docs/demo-model.md).
RESERVED_COLOUR_WORDS = ("pink", "brown")
RESERVED_SHAPE_WORDS = ("star", "diamond")
RESERVED_WORDS = RESERVED_COLOUR_WORDS + RESERVED_SHAPE_WORDS
LORA_SHAPE = "diamond"  # the reserved shape the demo LoRA teaches: a square turned 45 degrees, corners at its box's sides
DRAWN_SHAPES = SHAPES + (LORA_SHAPE,)  # what render draws and read tells apart

VOCABULARY = sorted({
    word for text in (
        " ".join(TRAIN_TEMPLATES + HELD_OUT_TEMPLATES + NO_BACKGROUND_TEMPLATES + TWO_SHAPE_TEMPLATES),
        " ".join(w for words in SIZE_WORDS.values() for w in words),
        " ".join(w for words in POSITION_WORDS.values() for w in words),
        " ".join(w for words in COLOUR_WORDS.values() for w in words),
        " ".join(SHAPES), "shape a an", " ".join(RESERVED_WORDS),
    ) for word in re.findall(r"[a-z]+", re.sub(r"\{\w+\}", " ", text))
})


@dataclasses.dataclass(frozen=True)
class Shape:
    shape: str
    colour: str
    size: str
    position: str
    offset: tuple[int, int] = (0, 0)  # jitter from the named position, pixels


@dataclasses.dataclass(frozen=True)
class Scene:
    background: str
    shapes: tuple[Shape, ...]
    # Which attributes the caption names; the others were chosen at random and are not checked.
    named: frozenset = frozenset({"background", "colour", "shape", "size", "position"})


@dataclasses.dataclass(frozen=True)
class Reading:
    """What the checker sees in a picture. Fields are None when it cannot tell."""
    background: Optional[str]
    colour: Optional[str]
    shape: Optional[str]
    size: Optional[str]
    position: Optional[str]


def render(scene: Scene) -> Image.Image:
    big = SIZE * SUPERSAMPLE
    image = Image.new("RGB", (big, big), PALETTE[scene.background])
    draw = ImageDraw.Draw(image)
    for item in scene.shapes:
        cx, cy = POSITIONS[item.position]
        cx, cy = (cx + item.offset[0]) * SUPERSAMPLE, (cy + item.offset[1]) * SUPERSAMPLE
        half = SIZES[item.size] * SUPERSAMPLE / 2
        box = (cx - half, cy - half, cx + half, cy + half)
        fill = PALETTE[item.colour]
        if item.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif item.shape == "square":
            draw.rectangle(box, fill=fill)
        elif item.shape == LORA_SHAPE:
            draw.polygon([(cx, cy - half), (cx + half, cy), (cx, cy + half), (cx - half, cy)], fill=fill)
        else:  # an upright isosceles triangle filling its box
            draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill)
    return image.reduce(SUPERSAMPLE)


def _pick(rng: np.random.Generator, options: Sequence):
    return options[int(rng.integers(len(options)))]


def _object_phrase(item: Shape, named: frozenset, rng: np.random.Generator) -> str:
    words = ["a"]
    if "size" in named:
        words.append(_pick(rng, SIZE_WORDS[item.size]))
    if "colour" in named:
        words.append(_pick(rng, COLOUR_WORDS[item.colour]))
    words.append(item.shape if "shape" in named else "shape")
    return " ".join(words)  # caption() makes "a orange" "an orange"


def caption(scene: Scene, rng: np.random.Generator, templates: Optional[Sequence[str]] = None) -> str:
    """Word `scene` in one of `templates` (by default the training wordings that fit it)."""
    named = scene.named
    if templates is None:
        if len(scene.shapes) == 2:
            templates = TWO_SHAPE_TEMPLATES
        else:
            templates = TRAIN_TEMPLATES if "background" in named else NO_BACKGROUND_TEMPLATES
    parts = {"bg": _pick(rng, COLOUR_WORDS[scene.background]) if "background" in named else ""}
    for key, item in zip(("", "2"), scene.shapes):
        parts["obj" + key] = _object_phrase(item, named, rng)
        parts["pos" + key] = _pick(rng, POSITION_WORDS[item.position]) if "position" in named else ""
    text = _pick(rng, templates).format(**parts)
    text = re.sub(r"\ba (?=[aeiou])", "an ", text)  # "an orange circle", "an orange background"
    return re.sub(r"\s+", " ", text.replace(" ,", ",")).strip()


def _random_shape(rng: np.random.Generator, background: str, colour: Optional[str] = None,
                  shape: Optional[str] = None, size: Optional[str] = None,
                  position: Optional[str] = None, allowed_pairs: Optional[set] = None,
                  shape_odds: Optional[Sequence[float]] = None) -> Shape:
    while True:
        c = colour or _pick(rng, [x for x in FOREGROUND_COLOURS if x != background])
        s = shape or (_pick(rng, SHAPES) if shape_odds is None else SHAPES[int(rng.choice(len(SHAPES), p=shape_odds))])
        if allowed_pairs is None or (c, s) in allowed_pairs:
            break
    offset = tuple(int(v) for v in rng.integers(-JITTER, JITTER + 1, size=2))
    return Shape(s, c, size or _pick(rng, tuple(SIZES)), position or _pick(rng, tuple(POSITIONS)), offset)


TRAIN_PAIRS = {(c, s) for c in FOREGROUND_COLOURS for s in SHAPES} - set(HELD_OUT_PAIRS)


def training_scene(rng: np.random.Generator, two_shapes: float = 0.1,
                   shape_odds: Optional[Sequence[float]] = None) -> Scene:
    """A random training scene (two shapes with chance `two_shapes`): held-out pairs never appear;
    some attributes go unnamed. `shape_odds`: the chance of each of SHAPES (default: equal)."""
    background = _pick(rng, BACKGROUND_COLOURS)
    if rng.random() < two_shapes:
        return _two_shape_scene(rng, background, TRAIN_PAIRS, shape_odds)
    named = {"shape"} if rng.random() < 0.9 else set()
    for attribute, chance in (("colour", 0.85), ("background", 0.8), ("size", 0.6), ("position", 0.7)):
        if rng.random() < chance:
            named.add(attribute)
    shape = _random_shape(rng, background, allowed_pairs=TRAIN_PAIRS, shape_odds=shape_odds)
    return Scene(background, (shape,), frozenset(named))


def _two_shape_scene(rng: np.random.Generator, background: str, pairs: set,
                     shape_odds: Optional[Sequence[float]] = None) -> Scene:
    """Two small shapes of different colours on opposite sides (left and right, or top and bottom)."""
    axis = _pick(rng, (("left", "right"), ("top", "bottom")))
    first = _random_shape(rng, background, size="small", position=axis[0], allowed_pairs=pairs, shape_odds=shape_odds)
    second = _random_shape(rng, background, size="small", position=axis[1], shape_odds=shape_odds,
                           allowed_pairs={pair for pair in pairs if pair[0] != first.colour})
    return Scene(background, (first, second), frozenset({"background", "colour", "shape", "size", "position"}))


def two_shape_prompts(count: int, seed: int = 0) -> list[tuple[str, Scene]]:
    """`count` prompts naming two small shapes of training colour-shape pairs on opposite sides, in
    the two-shape wordings ("a small red circle on the left and a small blue square on the right on
    a white background"): the scenes image editing is proven on."""
    rng = np.random.default_rng([seed, 9])  # a stream no training stage draws from (they use [seed, 0..3])
    prompts = []
    for _ in range(count):
        scene = _two_shape_scene(rng, _pick(rng, BACKGROUND_COLOURS), TRAIN_PAIRS)
        prompts.append((caption(scene, rng), scene))
    return prompts


def rendered_scenes(count: int, seed: int = 0) -> list[Scene]:
    """`count` random single-shape training scenes with every attribute named: for checking the checker."""
    rng = np.random.default_rng(seed)
    scenes = []
    while len(scenes) < count:
        scene = training_scene(rng)
        if len(scene.shapes) == 1:
            scenes.append(Scene(scene.background, scene.shapes))
    return scenes


def evaluation_prompts(count: int, seed: int = 0, held_out: bool = True) -> list[tuple[str, Scene]]:
    """`count` prompts naming colour, shape and background (size and position half the time).

    held_out: half use a held-out colour-shape pair in a training wording, half a training pair in a
    held-out wording. Otherwise: training pairs in training wordings (prompts like those trained on).
    """
    rng = np.random.default_rng(seed)
    prompts = []
    for index in range(count):
        background = _pick(rng, BACKGROUND_COLOURS)
        named = {"background", "colour", "shape"} | {a for a in ("size", "position") if rng.random() < 0.5}
        if held_out and index % 2 == 0:
            pairs = {pair for pair in HELD_OUT_PAIRS if pair[0] != background}
            item, templates = _random_shape(rng, background, allowed_pairs=pairs), TRAIN_TEMPLATES
        else:
            item = _random_shape(rng, background, allowed_pairs=TRAIN_PAIRS)
            templates = HELD_OUT_TEMPLATES if held_out else TRAIN_TEMPLATES
        scene = Scene(background, (item,), frozenset(named))
        prompts.append((caption(scene, rng, templates), scene))
    return prompts


def colourless_prompts(count: int, seed: int = 0, colour: str = "red") -> list[tuple[str, Scene]]:
    """`count` prompts naming a shape and a background but no shape colour, on backgrounds other than
    `colour` (so the shape could be `colour`): for measuring what a negative prompt does."""
    rng = np.random.default_rng(seed)
    prompts = []
    for _ in range(count):
        background = _pick(rng, [c for c in BACKGROUND_COLOURS if c != colour])
        scene = Scene(background, (_random_shape(rng, background),), frozenset({"background", "shape"}))
        prompts.append((caption(scene, rng, TRAIN_TEMPLATES), scene))
    return prompts


def lora_scene(rng: np.random.Generator) -> Scene:
    """A large diamond (the demo LoRA's reserved shape) of a training colour on a training background: the demo
    VAE draws a 36-pixel diamond back as one, while a 20-pixel one comes back with round corners (a circle)."""
    background = _pick(rng, BACKGROUND_COLOURS)
    named = {"shape"} | {a for a, chance in (("colour", 0.85), ("background", 0.8), ("size", 0.5), ("position", 0.7))
                         if rng.random() < chance}
    return Scene(background, (_random_shape(rng, background, shape=LORA_SHAPE, size="large"),), frozenset(named))


def lora_training_set(diamonds: int, others: int, seed: int = 0) -> list[tuple[str, Scene]]:
    """Captioned scenes to teach the reserved shape: `diamonds` of it, and `others` ordinary training scenes so
    that the rest stays as it was (prior preservation)."""
    rng = np.random.default_rng([seed, 11])  # a stream no other set draws from
    scenes = [lora_scene(rng) for _ in range(diamonds)] + [training_scene(rng) for _ in range(others)]
    return [(caption(scene, rng), scene) for scene in scenes]


def lora_evaluation_prompts(count: int, seed: int = 0) -> list[tuple[str, Scene]]:
    """`count` held-out prompts naming a large diamond, its colour and the background (position half the time),
    half of them in the wordings no training set uses."""
    rng = np.random.default_rng([seed, 12])
    prompts = []
    for index in range(count):
        background = _pick(rng, BACKGROUND_COLOURS)
        named = {"background", "colour", "shape", "size"} | ({"position"} if rng.random() < 0.5 else set())
        item = _random_shape(rng, background, shape=LORA_SHAPE, size="large")
        scene = Scene(background, (item,), frozenset(named))
        prompts.append((caption(scene, rng, HELD_OUT_TEMPLATES if index % 2 else TRAIN_TEMPLATES), scene))
    return prompts


def generate_images(prompts: Sequence[tuple[str, Scene]], first_seed: int = 0, **settings) -> list[Image.Image]:
    """One picture per prompt through the public API (prompt k uses seed first_seed + k)."""
    from .model import PixArtSigmaModel

    settings.setdefault("model_name", "demo")
    return [PixArtSigmaModel(seed=first_seed + k, **settings).generate(prompt)[0]
            for k, (prompt, _) in enumerate(prompts)]


# --- the checker -------------------------------------------------------------------------------

_NAMES = tuple(PALETTE)
_RGB = np.array([PALETTE[name] for name in _NAMES], dtype=np.float32)
MIN_SHAPE_PIXELS = 40  # fewer pixels of one colour than this is noise, not a shape


def _labels(image: Image.Image) -> np.ndarray:
    """Each pixel's nearest palette colour (index into _NAMES)."""
    pixels = np.asarray(image.convert("RGB").resize((SIZE, SIZE), Image.BOX), dtype=np.float32)
    distances = ((pixels[:, :, None, :] - _RGB[None, None]) ** 2).sum(-1)
    return distances.argmin(-1)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of `mask`."""
    components = _components(mask)
    return components[0] if components else np.zeros_like(mask, dtype=bool)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """The 4-connected regions of `mask`, largest first."""
    seen = np.zeros_like(mask, dtype=bool)
    regions: list = []
    height, width = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        stack, region = [(y0, x0)], []
        while stack:
            y, x = stack.pop()
            region.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        regions.append(region)
    out = []
    for region in sorted(regions, key=len, reverse=True):
        component = np.zeros_like(mask, dtype=bool)
        ys, xs = zip(*region)
        component[list(ys), list(xs)] = True
        out.append(component)
    return out


SHAPE_MATCH = 0.85  # least overlap (IoU) with an ideal shape (renders: 0.875 or more); blobs get none
SOFT_EDGE = 2  # pixels an ideal shape's box may reach past the mask's (see _shape_of)


def _ideal(shape: str, height: int, width: int) -> np.ndarray:
    """The renderer's shape filling a height x width box."""
    ys, xs = np.mgrid[0:height, 0:width]
    v, u = (ys + 0.5) / height, (xs + 0.5) / width  # 0..1 inside the box
    if shape == "square":
        return np.ones((height, width), dtype=bool)
    if shape == "circle":
        return (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    if shape == LORA_SHAPE:
        return np.abs(u - 0.5) + np.abs(v - 0.5) <= 0.5
    return np.abs(u - 0.5) <= v / 2  # apex at the top centre, base along the bottom


def _shape_of(box: np.ndarray) -> Optional[str]:
    """The shape whose ideal outline best overlaps the mask (cut to its bounding box), if well enough.

    The ideal's box may reach up to SOFT_EDGE pixels past the mask's at the top and on both sides: soft
    edges shave a triangle's thin apex and base corners off the mask, shrinking its box, and a triangle
    blurred by one pixel would otherwise read as no shape (squares and circles keep their boxes)."""
    height, width = box.shape
    overlaps = dict.fromkeys(DRAWN_SHAPES, 0.0)
    for top in range(SOFT_EDGE + 1):
        for side in range(SOFT_EDGE + 1):
            placed = np.zeros((height + top, width + 2 * side), dtype=bool)
            placed[top:, side:side + width] = box
            for shape in DRAWN_SHAPES:
                ideal = _ideal(shape, *placed.shape)
                overlaps[shape] = max(overlaps[shape], (placed & ideal).sum() / (placed | ideal).sum())
    best = max(overlaps, key=overlaps.get)
    return best if overlaps[best] >= SHAPE_MATCH else None


def _position_of(top: int, bottom: int, left: int, right: int) -> str:
    # The bounding box's centre: a triangle's centroid sits low.
    dx = (left + right) / 2 - (SIZE - 1) / 2
    dy = (top + bottom) / 2 - (SIZE - 1) / 2
    if max(abs(dx), abs(dy)) < 6.5:
        return "centre"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def _background(labels: np.ndarray) -> int:
    """The border's colour."""
    border = np.concatenate([labels[:2].ravel(), labels[-2:].ravel(), labels[:, :2].ravel(), labels[:, -2:].ravel()])
    return int(np.bincount(border, minlength=len(_NAMES)).argmax())


def _read_region(labels: np.ndarray, background: int, mask: np.ndarray) -> Reading:
    """A shape's colour (its most common palette colour), shape, size and position."""
    colour = Counter(int(v) for v in labels[mask & (labels != background)]).most_common(1)[0][0]
    ys, xs = np.nonzero(mask)
    top, bottom, left, right = ys.min(), ys.max(), xs.min(), xs.max()
    extent = max(bottom - top, right - left) + 1
    size = "large" if extent >= (SIZES["small"] + SIZES["large"]) / 2 else "small"
    return Reading(_NAMES[background], _NAMES[colour], _shape_of(mask[top:bottom + 1, left:right + 1]), size,
                   _position_of(top, bottom, left, right))


def _interior(mask: np.ndarray) -> np.ndarray:
    """The pixels of `mask` whose four neighbours are in it too."""
    inside = mask.copy()
    inside[1:] &= mask[:-1]
    inside[:-1] &= mask[1:]
    inside[:, 1:] &= mask[:, :-1]
    inside[:, :-1] &= mask[:, 1:]
    return inside


def read_shapes(image: Image.Image) -> list[Reading]:
    """Every shape in a picture, largest first: each colour besides the background's with an inside (at
    least MIN_SHAPE_PIXELS / 2 pixels whose four neighbours share it) is one shape (its largest region),
    with the blended colours along edges given to the nearest such colour, so that two shapes that touch
    are still read apart."""
    labels = _labels(image)
    background = _background(labels)
    shape_pixels = labels != background
    # A shape's colour has an inside; the blend along an edge is a thin ring of pixels with next to none.
    colours = [c for c in range(len(_NAMES)) if c != background and _interior(labels == c).sum() >= MIN_SHAPE_PIXELS // 2]
    if not colours:
        return []
    owner = labels.copy()
    blended = shape_pixels & ~np.isin(labels, colours)
    if blended.any():
        points = np.argwhere(blended)
        nearest = np.stack([np.min(((points[:, None] - np.argwhere(labels == c)[None]) ** 2).sum(-1), axis=1)
                            for c in colours])
        owner[tuple(points.T)] = np.array(colours)[nearest.argmin(0)]
    readings = []
    for colour in colours:
        mask = _largest_component(shape_pixels & (owner == colour))
        if mask.sum() >= MIN_SHAPE_PIXELS:
            readings.append((int(mask.sum()), _read_region(owner, background, mask)))
    return [reading for _, reading in sorted(readings, key=lambda pair: -pair[0])]


def two_shape_score(scenes: Sequence[Scene], images: Sequence[Image.Image]) -> float:
    """Share of pictures that show exactly the named shapes: each in its colour and its shape at its
    position, and no other shape."""
    right = 0
    for scene, image in zip(scenes, images):
        found = {(r.colour, r.shape, r.position) for r in read_shapes(image)}
        right += len(found) == len(scene.shapes) and found == {(s.colour, s.shape, s.position) for s in scene.shapes}
    return right / len(scenes)


def read(image: Image.Image) -> Reading:
    """Read one picture: background = the border's colour; the shape = the main other colour."""
    labels = _labels(image)
    background = _background(labels)
    inside = labels[2:-2, 2:-2]
    counts = Counter(int(v) for v in inside[inside != background].ravel())
    if not counts or counts.most_common(1)[0][1] < MIN_SHAPE_PIXELS:
        return Reading(_NAMES[background], None, None, None, None)
    colour = counts.most_common(1)[0][0]
    # Anti-aliased edges blend the two colours; count them into the shape so its outline stays whole.
    mask = _largest_component(labels != background)
    if mask.sum() < MIN_SHAPE_PIXELS:
        return Reading(_NAMES[background], _NAMES[colour], None, None, None)
    return dataclasses.replace(_read_region(labels, background, mask), colour=_NAMES[colour])


def score(scenes: Sequence[Scene], images: Sequence[Image.Image]) -> dict:
    """Share of pictures whose reading matches what the prompt named, per attribute (single shapes)."""
    hits: dict[str, list[bool]] = {}
    for scene, image in zip(scenes, images):
        reading, target = read(image), scene.shapes[0]
        expected = {"background": scene.background, "colour": target.colour, "shape": target.shape,
                    "size": target.size, "position": target.position}
        for attribute, value in expected.items():
            if attribute in scene.named:
                hits.setdefault(attribute, []).append(getattr(reading, attribute) == value)
    return {attribute: sum(v) / len(v) for attribute, v in hits.items()}


def shape_score_per_shape(scenes: Sequence[Scene], images: Sequence[Image.Image]) -> dict:
    """Share of pictures whose shape reads as named, per named shape (those the scenes have)."""
    per_shape = {}
    for shape in SHAPES:
        pairs = [(s, i) for s, i in zip(scenes, images) if s.shapes[0].shape == shape and "shape" in s.named]
        if pairs:
            per_shape[shape] = score(*zip(*pairs))["shape"]
    return per_shape


def reads_as_named(scene: Scene, image: Image.Image) -> bool:
    """Whether the checker reads every attribute the prompt named (single shapes)."""
    return min(score([scene], [image]).values()) == 1


def paired_wins(scenes: Sequence[Scene], first: Sequence[Image.Image], second: Sequence[Image.Image]) -> tuple[int, int]:
    """Two sets of pictures of the same prompts and seeds, compared picture by picture: how many read as
    named only in `first`, and how many only in `second`."""
    right = [(reads_as_named(s, a), reads_as_named(s, b)) for s, a, b in zip(scenes, first, second)]
    return right.count((True, False)), right.count((False, True))


def negative_prompt_trial(prompts: Sequence[tuple[str, Scene]], first_seed: int = 0, **settings) -> tuple[int, int, int]:
    """Negative prompts, paired: each prompt (naming no shape colour) is drawn plainly, then with the same
    seed once per shape colour (but its background's) with that colour as the negative prompt. Returns
    (prompt-colour pairs, how many plain pictures show the pair's colour, how many negative pictures
    show the colour their negative prompt names). A negative prompt that did nothing would show about as
    many as the plain pictures do (each plain picture counts once, for its own colour)."""
    pairs = plain_matches = negative_matches = 0
    for k, ((prompt, scene), image) in enumerate(zip(prompts, generate_images(prompts, first_seed, **settings))):
        drawn = read(image).colour
        for colour in (c for c in FOREGROUND_COLOURS if c != scene.background):
            negative = generate_images([(prompt, scene)], first_seed + k, negative_prompt=colour, **settings)[0]
            pairs += 1
            plain_matches += drawn == colour
            negative_matches += read(negative).colour == colour
    return pairs, plain_matches, negative_matches


def colour_share(images: Sequence[Image.Image], colour: str) -> float:
    """Share of pictures whose shape the checker reads as `colour`."""
    return sum(read(image).colour == colour for image in images) / len(images)
