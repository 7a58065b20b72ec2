"""Content of the bundled sample: drawable scenes and documents, bills, passages, math problems.

Each generator returns the raw input together with a reference answer that is true of it, so
the sample data trains and evaluates meaningfully: a caption describes the shapes actually
drawn, a VQA answer is text printed on the document, a summary opens with the bill's title,
text_qa answers are phrases of the passage, and math solutions compute their `#### N` result.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

COLORS = {"red": (214, 40, 40), "blue": (40, 90, 220), "green": (40, 150, 70),
          "yellow": (240, 205, 40), "purple": (130, 60, 170), "orange": (245, 140, 30)}
BACKGROUNDS = {"white": (250, 250, 250), "light blue": (205, 228, 245),
               "light yellow": (250, 243, 205), "light gray": (220, 220, 220)}
KINDS = ("circle", "square", "triangle")
WORDS = ("OPEN", "SALE", "HELLO", "PARK", "STOP", "CAFE")
_H = {"left": 1 / 6, "center": 1 / 2, "right": 5 / 6}
_V = {"top": 1 / 4, "middle": 1 / 2, "bottom": 3 / 4}


def _font(size: int):  # noqa: ANN202 - a PIL font
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


@dataclass
class Shape:
    kind: str
    color: str
    horizontal: str
    vertical: str
    large: bool


@dataclass
class Scene:
    width: int
    height: int
    background: str
    shapes: list[Shape]
    word: str | None = None


def random_scene(rng: random.Random) -> Scene:
    """One to three shapes in distinct slots; the first one is large."""
    slots = [(h, v) for h in _H for v in ("middle", "bottom")]
    chosen = rng.sample(slots, rng.randint(1, 3))
    shapes = [Shape(rng.choice(KINDS), rng.choice(sorted(COLORS)), h, v, large=i == 0)
              for i, (h, v) in enumerate(chosen)]
    word = rng.choice(WORDS) if rng.random() < 0.4 else None
    return Scene(rng.choice((128, 144, 160)), rng.choice((96, 112, 128)),
                 rng.choice(sorted(BACKGROUNDS)), shapes, word)


def draw_scene(scene: Scene):  # noqa: ANN201 - a PIL image
    """The scene as an RGB image."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (scene.width, scene.height), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        cx, cy = scene.width * _H[shape.horizontal], scene.height * _V[shape.vertical]
        r = min(scene.width, scene.height) * (0.2 if shape.large else 0.11)
        box = (cx - r, cy - r, cx + r, cy + r)
        fill = COLORS[shape.color]
        if shape.kind == "circle":
            draw.ellipse(box, fill=fill)
        elif shape.kind == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    if scene.word:
        draw.text((scene.width / 2, 4), scene.word, fill=(15, 15, 15), font=_font(14), anchor="ma")
    return image


def _where(shape: Shape) -> str:
    if shape.horizontal == "center":
        return "in the center" if shape.vertical == "middle" else f"at the {shape.vertical} center"
    if shape.vertical == "middle":
        return f"on the {shape.horizontal} side"
    return f"at the {shape.vertical} {shape.horizontal}"


def caption(scene: Scene) -> str:
    """A paragraph in the challenge's captioning style describing exactly what is drawn."""
    main, *others = scene.shapes
    parts = [f"The image shows a large {main.color} {main.kind} {_where(main)} of a plain "
             f"{scene.background} background."]
    parts += [f"A smaller {s.color} {s.kind} sits {_where(s)}." for s in others]
    if scene.word:
        parts.append(f'The word "{scene.word}" is written in black capital letters at the top '
                     "of the image.")
    parts.append("The shapes are flat, with clean edges and no shading, and nothing else "
                 "appears in the background.")
    warm = sum(s.color in ("red", "orange", "yellow") for s in scene.shapes) * 2 > len(scene.shapes)
    parts.append("The overall mood of the image is " + ("warm and cheerful." if warm else
                                                       "calm and simple."))
    return " ".join(parts)


@dataclass
class Document:
    lines: list[str]
    qa: list[tuple[str, str]] = field(default_factory=list)


def document(rng: random.Random) -> Document:
    """A short invoice or receipt with questions whose answers are printed on it."""
    number = str(rng.randint(1000, 9999))
    date = f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    vendor = rng.choice(("Acme Supply", "Blue Fox Ltd", "Delta Parts", "Oak & Co"))
    total = f"${rng.randint(5, 250)}.{rng.choice(('00', '25', '50', '99'))}"
    kind = rng.choice(("INVOICE", "RECEIPT"))
    return Document(
        [kind, f"No. {number}", f"Date: {date}", f"From: {vendor}", f"Total: {total}"],
        [(f"What is the {kind.lower()} number?", number),
         (f"What is the date on the {kind.lower()}?", date),
         (f"Who issued the {kind.lower()}?", vendor),
         ("What is the total amount?", total)],
    )


def draw_document(doc: Document):  # noqa: ANN201 - a PIL image
    """The document as black text on white."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (160, 16 + 16 * len(doc.lines)), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for i, line in enumerate(doc.lines):
        draw.text((8, 8 + 16 * i), line, fill=(0, 0, 0), font=_font(13 if i == 0 else 11))
    return image


_TOPICS = (("Clean Water Access", "the Administrator of the Environmental Protection Agency",
            "award grants to States for replacing lead drinking water pipes"),
           ("Rural Broadband Expansion", "the Secretary of Agriculture",
            "make loans for high-speed internet service in rural areas"),
           ("Veterans Housing Support", "the Secretary of Veterans Affairs",
            "provide rental assistance to veterans at risk of homelessness"),
           ("School Meals Improvement", "the Secretary of Agriculture",
            "reimburse schools for serving breakfast to all students"),
           ("Wildfire Prevention", "the Secretary of the Interior",
            "carry out forest thinning projects on federal land"),
           ("Bridge Safety", "the Secretary of Transportation",
            "inspect and repair structurally deficient highway bridges"),
           ("Small Business Lending", "the Administrator of the Small Business Administration",
            "guarantee loans to businesses with fewer than 50 employees"),
           ("Public Library Modernization", "the Director of the Institute of Museum and "
            "Library Services", "fund computer and internet upgrades for public libraries"))


def bill(rng: random.Random) -> tuple[str, str]:
    """(bill text, summary opening with the bill's official title)."""
    topic, agency, action = rng.choice(_TOPICS)
    title = f"{topic} Act of {rng.randint(2015, 2024)}"
    years = rng.randint(2, 6)
    amount = rng.choice((50, 100, 250, 500))
    text = (f"A BILL To direct {agency} to {action}, and for other purposes. Be it enacted by "
            "the Senate and House of Representatives of the United States of America in "
            "Congress assembled, SECTION 1. SHORT TITLE. "
            f"This Act may be cited as the \"{title}\". "
            f"SEC. 2. PROGRAM. (a) In General.--{agency[0].upper() + agency[1:]} shall {action}. "
            f"(b) Report.--Not later than {years} years after the date of enactment of this Act, "
            f"{agency} shall submit to Congress a report on the results of the program. "
            f"SEC. 3. AUTHORIZATION OF APPROPRIATIONS. There are authorized to be appropriated "
            f"${amount},000,000 for each fiscal year to carry out this Act.")
    summary = (f"{title} - Directs {agency} to {action}. Requires a report to Congress on the "
               f"results of the program within {years} years. Authorizes appropriations of "
               f"${amount} million per fiscal year.")
    return text, summary


_NAMES = ("Maria", "Daniel", "Aisha", "Kenji", "Laura", "Omar", "Sofia", "Peter")
_CITIES = ("Lisbon", "Denver", "Osaka", "Nairobi", "Toronto", "Krakow", "Busan", "Lyon")


def passage(rng: random.Random) -> tuple[str, list[tuple[str, str]]]:
    """(passage, [(question, answer)]) — some questions pass the text_qa filters, some don't."""
    name, friend = rng.sample(_NAMES, 2)
    city, trip = rng.sample(_CITIES, 2)
    job = rng.choice(("nurse", "baker", "teacher", "carpenter", "pilot"))
    pet, pet_name = rng.choice(("dog", "cat", "parrot")), rng.choice(("Biscuit", "Luna", "Pepper"))
    day = rng.choice(("Saturday", "Sunday", "Monday"))
    item = rng.choice(("fresh bread", "green apples", "a newspaper", "cheese"))
    hobby = rng.choice(("painting", "swimming", "gardening", "playing chess"))
    years = rng.randint(2, 15)
    text = (f"{name} is a {job} who lives in {city} with a {pet} named {pet_name}. Every {day}, "
            f"{name} walks to the market to buy {item}. {name}'s favorite hobby is {hobby}, "
            f"which {name} started {years} years ago. Last summer {name} visited {trip} with a "
            f"friend called {friend}, and they stayed there for a week.")
    qa = [(f"What is the name of {name}'s {pet}?", pet_name),
          (f"What does {name} buy at the market every {day}?", item),
          (f"How many years ago did {name} start {hobby}?", f"{years} years ago"),
          (f"Who traveled with {name} to {trip} last summer?", friend),
          (f"Which city did {name} visit last summer?", trip),
          (f"Where does {name} live?", city),
          ("What is her job?", job),
          (f"{name} stayed in {trip} for how long?", "a week")]
    return text, rng.sample(qa, rng.randint(5, len(qa)))


def math_problem(rng: random.Random) -> tuple[str, str]:
    """(word problem, step-by-step solution with <<calc>> notes ending in `#### N`)."""
    name = rng.choice(_NAMES)
    kind = rng.randrange(3)
    if kind == 0:
        a, b = rng.randint(2, 9), rng.randint(3, 12)
        c = rng.randint(1, a * b - 1)
        problem = (f"{name} has {a} boxes with {b} apples in each box. {name} gives away {c} "
                   "apples. How many apples does " + name + " have left?")
        steps = [f"{name} starts with {a} * {b} = <<{a}*{b}={a * b}>>{a * b} apples.",
                 f"After giving away {c}, {name} has {a * b} - {c} = <<{a * b}-{c}={a * b - c}>>"
                 f"{a * b - c} apples left."]
        answer = a * b - c
    elif kind == 1:
        price, count = rng.randint(2, 9), rng.randint(2, 6)
        note = 50 if price * count < 50 else 100
        problem = (f"A shop sells notebooks for ${price} each. {name} buys {count} notebooks and "
                   f"pays with a ${note} bill. How much change does {name} get?")
        steps = [f"The notebooks cost {count} * {price} = <<{count}*{price}={count * price}>>"
                 f"{count * price} dollars.",
                 f"The change is {note} - {count * price} = <<{note}-{count * price}="
                 f"{note - count * price}>>{note - count * price} dollars."]
        answer = note - count * price
    else:
        groups, size, absent = rng.randint(2, 5), rng.randint(3, 6), rng.randint(1, 4)
        total = groups * size + absent
        problem = (f"A class has {total} students. {absent} of them are absent, and the rest are "
                   f"split equally into {groups} groups. How many students are in each group?")
        steps = [f"{total} - {absent} = <<{total}-{absent}={total - absent}>>{total - absent} "
                 "students are present.",
                 f"Each group has {total - absent} / {groups} = <<{total - absent}/{groups}="
                 f"{size}>>{size} students."]
        answer = size
    return problem, "\n".join(steps + [f"#### {answer}"])
