"""Wiegand decode benchmark: the pure assembler fed with synthetic edge timestamps.

* valid frames of every built-in format (random facility/card, bit spacing 200 us..20 ms log-uniform,
  +-10 % jitter per bit, 20-100 us pulses) must all decode to the right card: count and % per format;
* corrupted frames (one flipped bit, one dropped bit, a 1 us glitch pulse, both lines low, a truncated
  frame) must give no CardRead at all: each reader accepts only its own format here. The same corrupted
  frames are also fed to a reader accepting several formats, where a frame with a dropped bit can land
  on another accepted length; those escapes are printed separately, as are double bit flips (which
  every two-parity Wiegand format lets through now and then) and flips of CSN frames (no parity);
* assembler CPU time per frame (process time, edges + end-of-frame poll + decode).

Prints one JSON object per line. `--quick` runs in well under 60 s.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections import Counter

from edge.readers.base import CardRead, ReaderEvent, ReaderFault
from edge.readers.formats import BUILTIN, CardFormat, FormatTable
from edge.readers.wiegand import FrameTiming, KeypadOptions, WiegandAssembler

Edge = tuple[float, int, bool]
MIXED_A = FormatTable([n for n in BUILTIN if n != "h10302"])
MIXED_B = FormatTable([n for n in BUILTIN if n != "h10304"])


def emit(metric: str, value: float, unit: str, **params: object) -> None:
    print(json.dumps({"metric": metric, "value": value, "unit": unit, "params": params}), flush=True)


def bit_list(bits: int, nbits: int) -> list[int]:
    return [(bits >> (nbits - 1 - i)) & 1 for i in range(nbits)]


def edges_for(bitseq: list[int], t0: float, rng: random.Random) -> list[Edge]:
    interval = math.exp(rng.uniform(math.log(200e-6), math.log(20e-3)))
    pulse = rng.uniform(20e-6, min(100e-6, interval / 3))
    out: list[Edge] = []
    t = t0
    for b in bitseq:
        out.append((t, b, False))
        out.append((t + pulse, b, True))
        t += interval * rng.uniform(0.9, 1.1)
    return out


def random_value(fmt: CardFormat, rng: random.Random) -> tuple[int | None, int]:
    fac = rng.getrandbits(fmt.fac_len) if fmt.has_facility else None
    return fac, rng.getrandbits(fmt.card_len)


class Feeder:
    """One assembler plus its clock; frames are 0.3 s apart."""

    def __init__(self, table: FormatTable, *, keypad: bool = True) -> None:
        self.asm = WiegandAssembler("bench", table, timing=FrameTiming(), pulse_edges=True,
                                    keypad=KeypadOptions(enabled=keypad))
        self.t = 1000.0
        self.cpu = 0.0
        self.frames = 0

    def feed(self, edges: list[Edge]) -> list[ReaderEvent]:
        out: list[ReaderEvent] = []
        asm = self.asm
        last = max(e[0] for e in edges)
        c0 = time.process_time()
        for ts, line, level in edges:
            out += asm.edge(ts, line, level)
        out += asm.poll(last + 0.06)
        self.cpu += time.process_time() - c0
        self.frames += 1
        self.t = last + 0.3
        return out


def corrupt(kind: str, fmt: CardFormat, bits: int, t0: float, rng: random.Random) -> list[Edge]:
    n = fmt.length
    seq = bit_list(bits, n)
    if kind == "flip":
        seq[rng.randrange(n)] ^= 1
        return edges_for(seq, t0, rng)
    if kind == "flip2":
        a, b = rng.sample(range(n), 2)
        seq[a] ^= 1
        seq[b] ^= 1
        return edges_for(seq, t0, rng)
    if kind == "drop":
        del seq[rng.randrange(n)]
        return edges_for(seq, t0, rng)
    if kind == "truncate":
        return edges_for(seq[: rng.randrange(1, n - 1)], t0, rng)
    edges = edges_for(seq, t0, rng)
    i = rng.randrange(len(edges) // 2)
    ts = edges[2 * i][0] + rng.uniform(150e-6, 180e-6)  # between two bits (spacing >= 180 us)
    if kind == "glitch":
        line = rng.randrange(2)
        edges += [(ts, line, False), (ts + rng.uniform(0.2e-6, 4e-6), line, True)]
    elif kind == "both_low":  # the other line falls while a pulse is low
        fall, line, _ = edges[2 * i]
        edges += [(fall + 5e-6, line ^ 1, False), (fall + 15e-6, line ^ 1, True)]
    else:
        raise ValueError(kind)
    edges.sort()
    return edges


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="a short run (< 60 s)")
    ap.add_argument("--frames", type=int, default=None, help="valid frames per format")
    ap.add_argument("--corrupted", type=int, default=None, help="corrupted frames in total")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    per_format = args.frames or (5_000 if args.quick else 100_000)
    n_corrupt = args.corrupted or (20_000 if args.quick else 100_000)
    rng = random.Random(args.seed)
    started = time.monotonic()

    # --- valid frames ------------------------------------------------------------------------------
    total_cpu = 0.0
    total_frames = 0
    for name, fmt in BUILTIN.items():
        feeder = Feeder(MIXED_B if name == "h10302" else MIXED_A)
        ok = 0
        for _ in range(per_format):
            fac, card = random_value(fmt, rng)
            out = feeder.feed(edges_for(bit_list(fmt.encode(fac, card), fmt.length), feeder.t, rng))
            if (len(out) == 1 and isinstance(out[0], CardRead) and out[0].format == name
                    and out[0].card == card and out[0].facility == fac):
                ok += 1
        emit("valid_frames_decoded", ok, "frames", format=name, sent=per_format,
             percent=round(100.0 * ok / per_format, 4))
        emit("assembler_cpu_per_frame", round(feeder.cpu / feeder.frames * 1e6, 2), "us",
             format=name, bits=fmt.length)
        total_cpu += feeder.cpu
        total_frames += feeder.frames
    emit("assembler_cpu_per_frame", round(total_cpu / total_frames * 1e6, 2), "us", format="all")

    # --- corrupted frames --------------------------------------------------------------------------
    parity_formats = [n for n, f in BUILTIN.items() if f.has_parity]
    detectable = ["flip", "drop", "glitch", "both_low", "truncate"]
    # card-only readers (keypad off: a frame cut to 4 or 8 bits would otherwise read as a key press)
    own = {n: Feeder(FormatTable([n]), keypad=False) for n in BUILTIN}
    mixed = {n: Feeder(MIXED_B if n == "h10302" else MIXED_A, keypad=False) for n in BUILTIN}
    reads = Counter[str]()
    reads_mixed = Counter[str]()
    faults = Counter[str]()
    sent = Counter[str]()
    for _ in range(n_corrupt):
        name = rng.choice(list(BUILTIN))
        fmt = BUILTIN[name]
        kinds = detectable if fmt.has_parity else [k for k in detectable if k != "flip"]
        kind = rng.choice(kinds)
        fac, card = random_value(fmt, rng)
        bits = fmt.encode(fac, card)
        sent[kind] += 1
        state = rng.getstate()
        for feeders, counter in ((own, reads), (mixed, reads_mixed)):
            rng.setstate(state)  # the same corruption for both readers
            out = feeders[name].feed(corrupt(kind, fmt, bits, feeders[name].t, rng))
            for ev in out:
                if isinstance(ev, CardRead):
                    counter[f"{name}/{kind}"] += 1
                elif counter is reads and isinstance(ev, ReaderFault):
                    faults[ev.kind] += 1
                elif counter is reads:
                    faults[type(ev).__name__] += 1
    emit("corrupted_frames_cardreads", sum(reads.values()), "cardreads", sent=n_corrupt,
         by_kind=dict(sent), faults=dict(faults), escapes=dict(reads))
    emit("corrupted_frames_cardreads_mixed_table", sum(reads_mixed.values()), "cardreads", sent=n_corrupt,
         accepted=MIXED_A.names, escapes=dict(reads_mixed))

    # --- what Wiegand cannot detect (informational) ------------------------------------------------
    n_info = max(n_corrupt // 10, 1000)
    escapes = Counter[str]()
    for _ in range(n_info):
        name = rng.choice(parity_formats)
        fmt = BUILTIN[name]
        fac, card = random_value(fmt, rng)
        feeder = own[name]
        out = feeder.feed(corrupt("flip2", fmt, fmt.encode(fac, card), feeder.t, rng))
        escapes[name] += sum(isinstance(e, CardRead) for e in out)
    emit("double_flip_cardreads", sum(escapes.values()), "cardreads", sent=n_info, by_format=dict(escapes),
         note="two flipped bits in one parity group pass any Wiegand parity check")
    csn_flips = 0
    for _ in range(n_info):
        name = rng.choice(["csn32", "csn56"])
        fmt = BUILTIN[name]
        feeder = own[name]
        out = feeder.feed(corrupt("flip", fmt, rng.getrandbits(fmt.length), feeder.t, rng))
        csn_flips += sum(isinstance(e, CardRead) for e in out)
    emit("csn_flip_cardreads", csn_flips, "cardreads", sent=n_info,
         note="CSN formats have no parity: a flipped bit reads as another number")
    emit("wall_time", round(time.monotonic() - started, 2), "s", quick=args.quick)


if __name__ == "__main__":
    main()
