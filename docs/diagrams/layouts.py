"""Draws docs/diagrams/layouts.svg, the three `natfwd provision` layouts, from the boxes and arrows described here.

Run `python docs/diagrams/layouts.py` after changing this file; tests/test_docs.py fails while the committed SVG
differs from what this script writes. Standard library only, and the output is the same bytes on every run: no
dates, no random ids, every number formatted by one function.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from xml.sax.saxutils import escape

HERE = Path(__file__).resolve().parent
OUTPUT = HERE / "layouts.svg"

Layout = Literal["single", "ha", "replicas"]
Anchor = Literal["start", "middle", "end"]

# Installed families only: GitHub shows the SVG as an <img>, which loads no web font, so the reader's own sans-serif
# draws the text. Widths are estimated for the widest of these (DejaVu Sans); a line that would not fit its box is an
# error here, not an overlap found later by eye.
FONT = "DejaVu Sans, Arial, Helvetica, sans-serif"
CHAR_WIDTH_EM = 0.61  # DejaVu Sans averages about 0.6 em for lower case and digits; capitals are wider
BOLD_FACTOR = 1.1

INK = "#232f3e"
MUTED = "#545b64"
VPC_GREEN = "#248814"
PUBLIC_FILL = "#eef6ea"
PRIVATE_FILL = "#e8f1fa"
PRIVATE_EDGE = "#147eba"
ZONE_FILL = "#f7f7f7"
ZONE_EDGE = "#8d99a8"
EC2_ORANGE = "#d45b07"
EC2_FILL = "#fff4e8"
SG_RED = "#c7131f"
NLB_PURPLE = "#693cc5"
NLB_FILL = "#f3eefc"
EIP_FILL = "#ffffff"

PANEL_WIDTH = 1000
PANEL_HEIGHT = 384


class DiagramError(ValueError):
    """A label does not fit the box it is drawn in."""


def num(value: float) -> str:
    """One formatting for every coordinate, so the output is the same bytes everywhere."""
    text = f"{value:.1f}"
    return text[:-2] if text.endswith(".0") else text


def text_width(text: str, size: float, *, bold: bool = False) -> float:
    """The estimated width of `text` in pixels at `size`."""
    width = 0.0
    for char in text:
        if char.isupper() or char in "mwMW@%":
            width += 0.74
        elif char in "il.,:;'|!()[] ":
            width += 0.36
        else:
            width += CHAR_WIDTH_EM
    return width * size * (BOLD_FACTOR if bold else 1.0)


@dataclass(frozen=True)
class Box:
    x: float
    y: float
    w: float
    h: float

    @property
    def right(self) -> float:
        return self.x + self.w

    @property
    def bottom(self) -> float:
        return self.y + self.h

    @property
    def cx(self) -> float:
        return self.x + self.w / 2

    @property
    def cy(self) -> float:
        return self.y + self.h / 2

    def inflate(self, by: float) -> Box:
        return Box(self.x - by, self.y - by, self.w + 2 * by, self.h + 2 * by)


class Canvas:
    """SVG elements in drawing order; text is checked against the box it belongs to."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def rect(
        self,
        box: Box,
        *,
        stroke: str,
        fill: str = "none",
        width: float = 1.2,
        dash: str | None = None,
        radius: float = 4,
    ) -> None:
        dashing = f' stroke-dasharray="{dash}"' if dash else ""
        self.parts.append(
            f'<rect x="{num(box.x)}" y="{num(box.y)}" width="{num(box.w)}" height="{num(box.h)}" rx="{num(radius)}" '
            f'fill="{fill}" stroke="{stroke}" stroke-width="{num(width)}"{dashing}/>'
        )

    def text(
        self,
        x: float,
        y: float,
        content: str,
        *,
        size: float = 11,
        color: str = INK,
        bold: bool = False,
        italic: bool = False,
        anchor: Anchor = "start",
        within: Box | None = None,
    ) -> None:
        """One line of text with its baseline at y; `within` is the box it must stay inside (with a margin)."""
        if within is not None:
            width = text_width(content, size, bold=bold)
            left = {"start": x, "middle": x - width / 2, "end": x - width}[anchor]
            margin = 3
            if left < within.x + margin or left + width > within.right - margin:
                raise DiagramError(
                    f"label {content!r} ({width:.0f} px at {size} px) does not fit its box "
                    f"x {within.x:.0f}..{within.right:.0f}; shorten it or widen the box"
                )
            if y - size < within.y or y + 3 > within.bottom:
                raise DiagramError(
                    f"label {content!r} at y {y:.0f} is outside its box y {within.y:.0f}..{within.bottom:.0f}"
                )
        style = ""
        if bold:
            style += ' font-weight="bold"'
        if italic:
            style += ' font-style="italic"'
        self.parts.append(
            f'<text x="{num(x)}" y="{num(y)}" font-size="{num(size)}" fill="{color}" text-anchor="{anchor}"{style}>'
            f"{escape(content)}</text>"
        )

    def lines(
        self,
        box: Box,
        contents: Sequence[tuple[str, str, bool]],
        *,
        size: float = 11,
        leading: float = 14,
        top: float | None = None,
    ) -> None:
        """Centred lines of (text, colour, bold), as a block centred in `box` unless `top` gives the first baseline."""
        first = top if top is not None else box.cy - (len(contents) - 1) * leading / 2 + size * 0.36
        for index, (content, color, bold) in enumerate(contents):
            self.text(
                box.cx, first + index * leading, content, size=size, color=color, bold=bold, anchor="middle", within=box
            )

    def arrow(
        self,
        points: Sequence[tuple[float, float]],
        *,
        color: str = INK,
        dash: str | None = None,
        width: float = 1.5,
    ) -> None:
        path = " ".join(("M" if index == 0 else "L") + f"{num(x)},{num(y)}" for index, (x, y) in enumerate(points))
        dashing = f' stroke-dasharray="{dash}"' if dash else ""
        self.parts.append(
            f'<path d="{path}" fill="none" stroke="{color}" stroke-width="{num(width)}"{dashing} '
            f'marker-end="url(#head-{color[1:]})"/>'
        )


# The arrowheads the diagram uses, one marker per colour (an SVG 1.1 marker cannot take its path's colour).
ARROW_COLOURS = (INK, EC2_ORANGE, NLB_PURPLE)


@dataclass(frozen=True)
class Grid:
    """Where the columns and the two zone bands of a panel are, in panel coordinates."""

    client: Box = Box(14, 150, 160, 86)
    vpc: Box = Box(190, 44, 796, 330)
    entry_x: float = 206
    entry_w: float = 168
    zone_x: float = 390
    zone_w: float = 584
    band_top: float = 78
    band_h: float = 136
    band_gap: float = 10
    public_x: float = 402
    public_w: float = 276
    private_x: float = 748
    private_w: float = 214

    def band(self, index: int) -> Box:
        return Box(self.zone_x, self.band_top + index * (self.band_h + self.band_gap), self.zone_w, self.band_h)

    def public(self, index: int) -> Box:
        band = self.band(index)
        return Box(self.public_x, band.y + 26, self.public_w, band.h - 40)

    def private(self, index: int) -> Box:
        band = self.band(index)
        return Box(self.private_x, band.y + 26, self.private_w, band.h - 40)

    def instance(self, index: int) -> Box:
        subnet = self.public(index)
        return Box(subnet.x + 16, subnet.y + 24, subnet.w - 32, subnet.h - 34)

    def group(self) -> Box:
        """The Auto Scaling group's outline, around both zones' public subnets, with a row for its label on top."""
        top = self.public(0).y - 20
        return Box(self.public_x - 8, top, self.public_w + 16, self.public(1).bottom + 8 - top)

    def entry(self, index: int) -> Box:
        """The Elastic IP's box in front of zone `index`."""
        instance = self.instance(index)
        return Box(self.entry_x + 14, instance.cy - 21, self.entry_w - 28, 42)


GRID = Grid()
ZONES = ("us-east-1a", "us-east-1b")
# Where the example cluster's three nodes are (ElastiCache spreads them over the subnet group's zones).
NODES = (("0001", "0003"), ("0002",))

TITLES: dict[Layout, str] = {
    "single": "single (the default): one instance holds the Elastic IP",
    "ha": "--ha: an Auto Scaling group of one; the replacement claims the same Elastic IP",
    "replicas": "--replicas 2: a Network Load Balancer, one Elastic IP per zone, in front of two instances",
}


def draw_client(canvas: Canvas, layout: Layout) -> None:
    box = GRID.client
    canvas.rect(box, stroke=INK, fill="#ffffff", width=1.4)
    dials = "dials an EIP:11211-11213" if layout == "replicas" else "dials EIP:11211-11213"
    canvas.lines(
        box,
        [
            ("trusted client", INK, True),
            ("198.51.100.27/32", INK, False),
            ("--trusted-cidr", MUTED, False),
            (dials, MUTED, False),
        ],
        size=11,
        leading=16,
    )


def draw_vpc(canvas: Canvas) -> None:
    canvas.rect(GRID.vpc, stroke=VPC_GREEN, width=1.6, radius=2)
    canvas.text(
        GRID.vpc.x + 12,
        GRID.vpc.y + 20,
        "VPC of the cache cluster, us-east-1",
        size=12,
        color=VPC_GREEN,
        bold=True,
        within=GRID.vpc,
    )


def draw_zone(canvas: Canvas, index: int, *, public: bool) -> None:
    band = GRID.band(index)
    canvas.rect(band, stroke=ZONE_EDGE, fill=ZONE_FILL, dash="6 4", radius=6)
    label = f"zone {'AB'[index]} ({ZONES[index]})"
    # On the right, above the private subnet: the Auto Scaling group's outline crosses the left of the band.
    canvas.text(band.right - 10, band.y + 17, label, size=11, color=MUTED, bold=True, anchor="end", within=band)
    if public:
        subnet = GRID.public(index)
        canvas.rect(subnet, stroke=VPC_GREEN, fill=PUBLIC_FILL)
        canvas.text(subnet.x + 8, subnet.y + 15, "public subnet", size=10.5, color=VPC_GREEN, within=subnet)
    private = GRID.private(index)
    canvas.rect(private, stroke=PRIVATE_EDGE, fill=PRIVATE_FILL)
    canvas.text(private.x + 8, private.y + 15, "private subnet", size=10.5, color=PRIVATE_EDGE, within=private)
    chips = NODES[index]
    chip_w, chip_h, gap = 92.0, 26.0, 10.0
    left = private.cx - (len(chips) * chip_w + (len(chips) - 1) * gap) / 2
    for number, node in enumerate(chips):
        chip = Box(left + number * (chip_w + gap), private.y + 24, chip_w, chip_h)
        canvas.rect(chip, stroke=PRIVATE_EDGE, fill="#ffffff", radius=3)
        canvas.text(chip.cx, chip.y + 17, f"node {node}", size=11, anchor="middle", within=chip)
    canvas.text(
        private.cx,
        private.bottom - 22,
        "cache sg: the node port",
        size=10.5,
        color=SG_RED,
        anchor="middle",
        within=private,
    )
    canvas.text(
        private.cx,
        private.bottom - 8,
        "from natfwd's sg only",
        size=10.5,
        color=SG_RED,
        anchor="middle",
        within=private,
    )


def draw_instance(canvas: Canvas, index: int, lines: Sequence[tuple[str, str, bool]], *, ghost: bool = False) -> None:
    box = GRID.instance(index)
    if ghost:
        canvas.rect(box, stroke=EC2_ORANGE, fill="#ffffff", dash="5 4", width=1.4)
    else:
        canvas.rect(box.inflate(4), stroke=SG_RED, dash="3 3", width=1.1, radius=6)
        canvas.rect(box, stroke=EC2_ORANGE, fill=EC2_FILL, width=1.6)
    canvas.lines(box, lines, size=11, leading=14)


def draw_eip(canvas: Canvas, index: int, address: str, *, zone_label: bool = False) -> Box:
    box = GRID.entry(index)
    canvas.rect(box, stroke=INK, fill=EIP_FILL, width=1.4, radius=21)
    title = f"Elastic IP, zone {'AB'[index]}" if zone_label else "Elastic IP"
    canvas.lines(box, [(title, INK, True), (address, INK, False)], size=11, leading=14)
    return box


def node_arrows(canvas: Canvas, index: int, *, color: str = INK, dash: str | None = None) -> None:
    """natfwd on the instance in zone `index` connects to every node: its own zone's and the other zone's."""
    instance = GRID.instance(index).inflate(4)
    for target in (0, 1):
        private = GRID.private(target)
        start_y = instance.cy + (8 if target > index else -8 if target < index else 0)
        end_y = private.cy + (-12 if target > index else 12 if target < index else 0)
        canvas.arrow([(instance.right, start_y), (private.x - 2, end_y)], color=color, dash=dash)


def client_arrow(canvas: Canvas, target: Box, *, offset: float = 0) -> None:
    start = (GRID.client.right, GRID.client.cy + offset)
    canvas.arrow([start, (target.x - 2, target.cy)], color=INK)


def draw_single(canvas: Canvas) -> None:
    draw_zone(canvas, 0, public=True)
    draw_zone(canvas, 1, public=False)
    band = GRID.band(1)
    public_area = Box(GRID.public_x, band.y + 26, GRID.public_w, band.h - 34)
    canvas.text(
        public_area.cx,
        public_area.cy - 6,
        "no NAT instance in this zone:",
        size=11,
        color=MUTED,
        italic=True,
        anchor="middle",
        within=public_area,
    )
    canvas.text(
        public_area.cx,
        public_area.cy + 10,
        "zone A down = clients cut off",
        size=11,
        color=MUTED,
        italic=True,
        anchor="middle",
        within=public_area,
    )
    draw_instance(
        canvas,
        0,
        [
            ("natfwd instance (t4g.micro)", EC2_ORANGE, True),
            ("sg: node ports from --trusted-cidr", SG_RED, False),
            ("provision moves the EIP on change", MUTED, False),
        ],
    )
    eip = draw_eip(canvas, 0, "203.0.113.73")
    client_arrow(canvas, eip)
    canvas.arrow([(eip.right, eip.cy), (GRID.instance(0).x - 6, eip.cy)])
    node_arrows(canvas, 0)


def draw_ha(canvas: Canvas) -> None:
    for index in (0, 1):
        draw_zone(canvas, index, public=True)
    group = GRID.group()
    canvas.rect(group, stroke=EC2_ORANGE, dash="8 4", width=1.6, radius=8)
    label = "Auto Scaling group: min = max = desired = 1"
    canvas.text(group.x + 8, group.y + 14, label, size=10.5, color=EC2_ORANGE, bold=True, within=group)
    draw_instance(
        canvas,
        0,
        [
            ("natfwd instance (t4g.micro)", EC2_ORANGE, True),
            ("sg: node ports from --trusted-cidr", SG_RED, False),
            ("unhealthy when natfwd is down", MUTED, False),
        ],
    )
    draw_instance(
        canvas,
        1,
        [
            ("its replacement, in any zone", EC2_ORANGE, True),
            ("same launch template and sg;", MUTED, False),
            ("claims the EIP at boot", MUTED, False),
        ],
        ghost=True,
    )
    eip = draw_eip(canvas, 0, "203.0.113.73")
    client_arrow(canvas, eip)
    canvas.arrow([(eip.right, eip.cy), (GRID.instance(0).x - 6, eip.cy)])
    replacement = GRID.instance(1)
    bend_x = eip.cx
    canvas.arrow(
        [(bend_x, eip.bottom), (bend_x, replacement.cy), (replacement.x - 2, replacement.cy)],
        color=EC2_ORANGE,
        dash="5 4",
    )
    canvas.text(
        bend_x + 6,
        replacement.cy - 8,
        "moves on failure",
        size=10.5,
        color=EC2_ORANGE,
        within=Box(bend_x, replacement.y - 10, replacement.x - bend_x, replacement.h),
    )
    node_arrows(canvas, 0)


def draw_replicas(canvas: Canvas) -> None:
    for index in (0, 1):
        draw_zone(canvas, index, public=True)
    group = GRID.group()
    canvas.rect(group, stroke=EC2_ORANGE, dash="8 4", width=1.6, radius=8)
    canvas.text(
        group.x + 8,
        group.y + 14,
        "Auto Scaling group of 2, ELB health checks",
        size=10.5,
        color=EC2_ORANGE,
        bold=True,
        within=group,
    )
    for index in (0, 1):
        draw_instance(
            canvas,
            index,
            [
                ("natfwd instance (t4g.micro)", EC2_ORANGE, True),
                ("sg: node ports from the NLB's sg", SG_RED, False),
                ("a target of every target group", MUTED, False),
            ],
        )
    nlb = Box(GRID.entry_x, GRID.group().y, GRID.entry_w, GRID.group().h)
    canvas.rect(nlb.inflate(4), stroke=SG_RED, dash="3 3", width=1.1, radius=8)
    canvas.rect(nlb, stroke=NLB_PURPLE, fill=NLB_FILL, width=1.6, radius=6)
    canvas.text(
        nlb.cx, nlb.y + 15, "Network Load Balancer", size=11, color=NLB_PURPLE, bold=True, anchor="middle", within=nlb
    )
    middle = Box(nlb.x, GRID.entry(0).bottom, nlb.w, GRID.entry(1).y - GRID.entry(0).bottom)
    canvas.lines(
        middle,
        [
            ("internet-facing", NLB_PURPLE, False),
            ("per node port: a TCP", INK, False),
            ("listener, a target group,", INK, False),
            ("TCP health checks,", INK, False),
            ("client IP preserved", INK, False),
            ("sg: --trusted-cidr only", SG_RED, False),
        ],
        size=10.5,
        leading=13,
    )
    for index, address in ((0, "203.0.113.10"), (1, "203.0.113.20")):
        eip = draw_eip(canvas, index, address, zone_label=True)
        client_arrow(canvas, eip, offset=-14 if index == 0 else 14)
        canvas.arrow([(eip.right, eip.cy), (GRID.instance(index).x - 6, eip.cy)], color=NLB_PURPLE)
        node_arrows(canvas, index)


def draw_legend(canvas: Canvas, layout: Layout) -> None:
    """What the dashed outlines mean, under the client box."""
    area = Box(8, GRID.client.bottom + 24, GRID.vpc.x - 14, 100)
    entries: list[tuple[str, str, str]] = [(SG_RED, "3 3", "security group"), (ZONE_EDGE, "6 4", "availability zone")]
    if layout != "single":
        entries.append((EC2_ORANGE, "8 4", "Auto Scaling group"))
    for index, (color, dash, label) in enumerate(entries):
        y = area.y + 8 + index * 22
        canvas.rect(Box(area.x + 8, y, 26, 14), stroke=color, dash=dash, width=1.4, radius=3)
        canvas.text(area.x + 42, y + 11, label, size=10.5, color=MUTED, within=area)


DRAW = {"single": draw_single, "ha": draw_ha, "replicas": draw_replicas}


def panel(layout: Layout) -> list[str]:
    canvas = Canvas()
    canvas.text(14, 26, TITLES[layout], size=15, bold=True, within=Box(0, 0, PANEL_WIDTH, 40))
    draw_client(canvas, layout)
    draw_legend(canvas, layout)
    draw_vpc(canvas)
    DRAW[layout](canvas)
    return canvas.parts


def render(layouts: Sequence[Layout] = ("single", "ha", "replicas")) -> str:
    """The whole SVG document, one panel per layout, stacked."""
    height = PANEL_HEIGHT * len(layouts)
    out = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{PANEL_WIDTH}" height="{height}" '
        f'viewBox="0 0 {PANEL_WIDTH} {height}" font-family="{FONT}">',
        "<title>natfwd provision layouts: single, --ha, --replicas 2</title>",
        "<defs>",
    ]
    for color in ARROW_COLOURS:
        out.append(
            f'<marker id="head-{color[1:]}" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
            f'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="{color}"/></marker>'
        )
    out.append("</defs>")
    # An opaque background: on GitHub's dark theme a transparent SVG would put dark text on a dark page.
    out.append(f'<rect width="{PANEL_WIDTH}" height="{height}" fill="#ffffff"/>')
    for index, layout in enumerate(layouts):
        out.append(f'<g id="{layout}" transform="translate(0,{num(index * PANEL_HEIGHT)})">')
        if index:
            out.append(f'<line x1="0" y1="0" x2="{PANEL_WIDTH}" y2="0" stroke="{ZONE_EDGE}" stroke-width="1"/>')
        out.extend(panel(layout))
        out.append("</g>")
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=OUTPUT, help="where to write the SVG (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        document = render()
    except DiagramError as exc:
        print(f"layouts.py: error: {exc}", file=sys.stderr)
        return 1
    args.output.write_text(document, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
