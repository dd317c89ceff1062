"""Compile a captured launch for a GPU and read what the compiler made of it.

No GPU is needed: ``triton.compile`` goes down to a cubin for a ``GPUTarget``,
and the ``nvdisasm`` / ``cuobjdump`` that Triton ships print its SASS and its
resource usage.

The main loop. SASS is read as a list of instructions with labels; a loop is a
branch to an earlier address (a back edge) and spans [target, branch]. The main
loop is the innermost loop that holds a tensor-core instruction (HGMMA / HMMA);
where the Triton IR has more innermost dot loops than the SASS has tensor loops
(a ``tl.dot`` of fp32 operands at IEEE precision is lowered to FFMAs), the
innermost FFMA loops count too, so an FMA product is priced per trip like an MMA
one. A kernel without either (an elementwise kernel) has none. Its trip count is not
in the SASS: it is evaluated from the Triton IR, whose innermost ``scf.for``
holding a ``tt.dot`` has bounds made of the kernel's integer arguments,
constants and program ids (taken as 0: the first program stands for all).
"""
import math
import os
import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field

TENSOR = ("HGMMA", "HMMA", "IMMA", "QGMMA", "IGMMA")
INTEGER = ("IMAD", "IADD3", "IADD", "LOP3", "LOP", "SHF", "SHL", "SHR", "LEA", "SEL", "ISETP",
           "VIADD", "IABS", "IMNMX", "VIMNMX", "PRMT", "I2F", "I2FP", "F2I", "POPC", "FLO",
           "IMUL", "BMSK", "SGXT", "BREV", "ICMP")
FLOAT = ("FFMA", "FMUL", "FADD", "FSETP", "FSEL", "FMNMX", "F2F", "F2FP", "MUFU", "HFMA2",
         "HADD2", "HMUL2", "FCHK", "DFMA", "DADD", "DMUL", "FSWZADD")
MEMORY = ("LDG", "STG", "LDS", "STS", "LDSM", "STSM", "LDGSTS", "UTMALDG", "UTMASTG",
          "UBLKCP", "LDL", "STL", "ATOM", "ATOMS", "RED", "LD", "ST", "LDC", "ULDC")
GLOBAL_MEMORY = ("LDG", "STG", "LDGSTS", "ATOM", "RED")


@dataclass
class Instruction:
    address: int
    opcode: str          # with modifiers: IMAD.HI.U32
    text: str
    target: str = None   # branch target label

    @property
    def base(self):
        return self.opcode.split(".")[0]


@dataclass
class Sass:
    instructions: list
    labels: dict         # label -> address

    def loops(self):
        """(start, end) address spans of the back edges."""
        spans = []
        for ins in self.instructions:
            if ins.target is not None and ins.target in self.labels:
                start = self.labels[ins.target]
                if start <= ins.address:
                    spans.append((start, ins.address))
        return spans

    def between(self, start, end):
        return [i for i in self.instructions if start <= i.address <= end]

    def tensor_loops(self):
        """The innermost loops holding a tensor-core instruction, in program order."""
        candidates = [(start, end) for start, end in self.loops()
                      if any(i.base in TENSOR for i in self.between(start, end))]
        return sorted(span for span in candidates
                      if not any(other != span and span[0] <= other[0] and other[1] <= span[1]
                                 for other in candidates))

    def fma_loops(self):
        """The innermost loops holding FFMAs and no tensor-core instruction, outside
        every tensor loop: a ``tl.dot`` the compiler lowered to FMAs (fp32 operands
        at IEEE precision) and other arithmetic loops."""
        tensor = self.tensor_loops()
        candidates = [(start, end) for start, end in self.loops()
                      if any(i.base == "FFMA" for i in self.between(start, end))
                      and not any(i.base in TENSOR for i in self.between(start, end))]
        return sorted(span for span in candidates
                      if not any(other != span and span[0] <= other[0] and other[1] <= span[1]
                                 for other in candidates)
                      and not any(t[0] <= span[0] and span[1] <= t[1] for t in tensor))

    def dot_loops(self, expected=None):
        """The loops a ``tl.dot`` runs in, in program order: the innermost tensor
        loops, and with them the FMA loops when the Triton IR has ``expected``
        innermost dot loops and the tensor loops alone are fewer (a kernel whose
        products run on the FMA pipes loops as many times as one on the tensor cores)."""
        tensor = self.tensor_loops()
        if expected is None or len(tensor) >= expected:
            return tensor
        both = sorted(tensor + self.fma_loops())
        return both if len(both) == expected else tensor

    def main_loop(self):
        """The first (in program order) innermost loop holding a tensor-core
        instruction, or None. The first, because a GEMM's main loop comes before
        the loops of its epilogue (a LoRA epilogue loops over rank chunks with
        tensor instructions of its own), as in the Triton IR whose trip count
        ``main_loop_trips`` reads."""
        loops = self.tensor_loops()
        return loops[0] if loops else None


_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s*(?:\{\s*)?(@!?U?P[0-9T]+\s+)?([A-Z][A-Za-z0-9_.]*)"
                   r"(.*?);")
_LABEL = re.compile(r"^(\.L[\w.]+):")
_TARGET = re.compile(r"`\((\.L[\w.]+)\)")


def parse_sass(text):
    """nvdisasm output -> Sass (the instructions in address order, labels)."""
    instructions, labels, pending = [], {}, []
    for line in text.splitlines():
        label = _LABEL.match(line.strip())
        if label:
            pending.append(label.group(1))
            continue
        match = _LINE.match(line)
        if not match:
            continue
        address = int(match.group(1), 16)
        for name in pending:
            labels[name] = address
        pending = []
        target = _TARGET.search(match.group(4))
        instructions.append(Instruction(address, match.group(3), line.strip(),
                                        target.group(1) if target else None))
    return Sass(instructions, labels)


def category(opcode):
    base = opcode.split(".")[0]
    if base in TENSOR:
        return "tensor"
    if base in MEMORY:
        return "memory"
    if base in INTEGER:
        return "integer"
    if base in FLOAT:
        return "float"
    return "other"


def instruction_mix(instructions):
    """Counts per category and of the opcodes this report singles out."""
    mix = Counter(category(i.opcode) for i in instructions)
    mix["total"] = len(instructions)
    mix["imad_hi"] = sum(i.opcode.startswith("IMAD.HI") for i in instructions)
    for name in ("HGMMA", "HMMA", "LDGSTS", "UTMALDG", "LDG", "STG", "LDS", "LDSM", "STS",
                 "LOP3", "IMAD", "LDL", "STL", "BAR"):
        mix[name] = sum(i.base == name for i in instructions)
    return dict(mix)


def philox_rounds(instructions):
    """Philox4x32 multiplies two counters per round (two IMAD.HI); returns
    IMAD.HI / 2, the rounds the instructions amount to, all elements together."""
    return sum(i.opcode.startswith("IMAD.HI") for i in instructions) / 2


_MMA_SHAPE = re.compile(r"\.(\d+)x(\d+)x(\d+)")


def tensor_flops(ins, num_warps):
    """FLOPs of one static tensor instruction executed by a whole CTA.

    HGMMA (wgmma) is one warpgroup (4 warps) operation; HMMA is per warp."""
    if ins.base == "HGMMA":
        m, n, k = (int(v) for v in _MMA_SHAPE.search(ins.opcode).groups())
        return 2 * m * n * k * max(1, num_warps // 4)
    if ins.base == "HMMA":
        digits = ins.opcode.split(".")[1]  # 16816 -> m16 n8 k16; 1688 -> m16 n8 k8
        m, n, k = 16, 8, int(digits[3:])
        return 2 * m * n * k * num_warps
    return 0


def access_bytes(ins):
    """Bytes one thread moves with a global memory instruction."""
    parts = ins.opcode.split(".")
    for width, size in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1)):
        if width in parts:
            return size
    return 4


def run_tool(tool, *args):
    from triton.backends.nvidia import __file__ as nvidia_init
    path = os.path.join(os.path.dirname(nvidia_init), "bin", tool)
    return subprocess.run([path, *args], check=True, capture_output=True, text=True).stdout


def disassemble(cubin):
    """(SASS text, resource usage {'REG', 'STACK', 'LOCAL', 'SHARED', ...})."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = run_tool("nvdisasm", "-c", f.name)
        usage = run_tool("cuobjdump", "-res-usage", f.name)
    resources = {k: int(v) for k, v in re.findall(r"\b([A-Z]+):(\d+)", usage)}
    return sass, resources


# ---- the trip count, from the Triton IR

_TTIR_ARG = re.compile(r"%(\w+): (i\d+)")
_TTIR_DEF = re.compile(r"^\s*%([\w.]+) = (arith\.\w+|tt\.get_program_id)\s+(.*?)\s*(?:loc\(|$)")
_TTIR_FOR = re.compile(r"^(\s*)(?:%[\w:.]+ = )?scf\.for %[\w.]+ = %([\w.]+) to %([\w.]+) "
                       r"step %([\w.]+)")
_BINARY = {"addi": lambda a, b: a + b, "subi": lambda a, b: a - b, "muli": lambda a, b: a * b,
           "divsi": lambda a, b: int(a / b), "divui": lambda a, b: a // b,
           "ceildivsi": lambda a, b: -(-a // b), "remsi": lambda a, b: int(math.fmod(a, b)),
           "minsi": min, "maxsi": max, "minui": min, "maxui": max}


def _evaluate(name, defs, values, depth=0):
    if name in values:
        return values[name]
    if name not in defs or depth > 64:
        raise KeyError(name)
    op, rest = defs[name]
    kind = op.split(".")[1]
    operands = re.findall(r"%([\w.]+)", rest.split(":")[0])
    if kind == "get_program_id":
        value = 0
    elif kind == "constant":
        value = int(re.match(r"(-?\d+)", rest).group(1))
    elif kind in ("extsi", "extui", "trunci", "index_cast"):
        value = _evaluate(operands[0], defs, values, depth + 1)
    elif kind in _BINARY:
        a, b = (_evaluate(o, defs, values, depth + 1) for o in operands[:2])
        value = _BINARY[kind](a, b)
    else:
        raise KeyError(name)
    values[name] = value
    return value


DOT_OPS = ("tt.dot", "ttng.warp_group_dot", "tt.dot_scaled")


def loop_trips(ttir, int_args):
    """Trip counts of the innermost ``scf.for`` loops holding a dot, in program
    order, for the first program; None for a loop whose bounds cannot be
    evaluated."""
    lines = ttir.splitlines()
    defs = {}
    for line in lines:
        match = _TTIR_DEF.match(line)
        if match and match.group(3).split(":")[0].strip() and "tensor<" not in line:
            defs[match.group(1)] = (match.group(2), match.group(3))
    return [_trips(bounds, defs, int_args) for _, bounds in _innermost_dot_loops(lines)]


def _innermost_dot_loops(lines):
    """(body line span, (lower, upper, step) names) of each innermost ``scf.for``
    holding a dot, in program order."""
    loops = []  # (indent, line index, bounds)
    for index, line in enumerate(lines):
        match = _TTIR_FOR.match(line)
        if match:
            loops.append((len(match.group(1)), index, match.groups()[1:]))

    def body(indent, start):
        for end in range(start + 1, len(lines)):
            stripped = lines[end].lstrip()
            if stripped.startswith("}") and len(lines[end]) - len(stripped) == indent:
                return start + 1, end
        return start + 1, len(lines)

    spans = [(body(indent, start), bounds) for indent, start, bounds in loops]
    with_dot = [(span, bounds) for span, bounds in spans
                if any(op in lines[i] for i in range(*span) for op in DOT_OPS)]
    return [(span, bounds) for span, bounds in with_dot
            if not any(other != span and span[0] <= other[0] and other[1] <= span[1]
                       for other, _ in with_dot)]


_DESCRIPTOR_LOAD = re.compile(r"tt\.descriptor_load .*-> tensor<([\dx]+)x(\w+)>")
_ELEMENT_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "i8": 1, "f8E4M3FN": 1, "f8E5M2": 1}


def descriptor_load_bytes(ttir):
    """Bytes the TMA unit loads per trip of each innermost loop holding a dot
    (``tt.descriptor_load`` boxes: one per load per trip), in program order.
    TMA copies are not LDG/LDGSTS instructions, so the SASS widths miss them."""
    lines = ttir.splitlines()
    totals = []
    for (start, end), _ in _innermost_dot_loops(lines):
        total = 0
        for line in lines[start:end]:
            match = _DESCRIPTOR_LOAD.search(line)
            if match:
                elements = math.prod(int(d) for d in match.group(1).split("x"))
                total += elements * _ELEMENT_BYTES[match.group(2)]
        totals.append(total)
    return totals


def main_loop_trips(ttir, int_args):
    """Trip count of the first innermost ``scf.for`` holding a dot, for the first
    program; None when the kernel has no such loop or its bounds cannot be
    evaluated."""
    trips = loop_trips(ttir, int_args)
    return trips[0] if trips else None


def _trips(bounds, defs, int_args):
    lower, upper, step = bounds
    try:
        values = dict(int_args)
        lo, hi, st = (_evaluate(v, defs, values) for v in (lower, upper, step))
    except (KeyError, ValueError, ZeroDivisionError):
        return None
    return max(0, -(-(hi - lo) // st))


# ---- one compiled kernel

@dataclass
class KernelReport:
    name: str
    arch: int
    regs: int
    spills: int            # bytes of stack frame and local memory per thread (spill slots)
    spill_instructions: int
    shared_bytes: int
    num_warps: int
    num_stages: int
    wgmma: bool
    tma: bool
    sass: dict             # 'kernel' and 'main_loop' instruction mixes
    main_loop_instructions: int
    other_instructions: int
    loop_tensor_flops: int   # per CTA per iteration
    other_tensor_flops: int  # per CTA, once
    loop_global_bytes: int   # per CTA per iteration
    other_global_bytes: int  # per CTA, once
    ttir: str = field(repr=False, default="")
    # innermost tensor loops after the main loop (a LoRA epilogue's rank chunks, a
    # decode GEMM's rank product), per CTA per iteration: instructions,
    # tensor_flops, global_bytes, imads
    later_loops: list = field(default_factory=list)

    def as_json(self):
        return {"name": self.name, "arch": f"sm_{self.arch}", "regs": self.regs,
                "spills": self.spills, "shared_bytes": self.shared_bytes,
                "num_warps": self.num_warps, "num_stages": self.num_stages,
                "wgmma": self.wgmma, "tma": self.tma, "sass": self.sass}


def analyse(name, arch, metadata, cubin, ttir):
    text, resources = disassemble(cubin)
    sass = parse_sass(text)
    loops = sass.dot_loops(len(_innermost_dot_loops(ttir.splitlines())) if ttir else None)
    loop = loops[0] if loops else None
    inside = sass.between(*loop) if loop else []
    later = [sass.between(*span) for span in loops[1:]]
    in_loops = {id(i) for i in inside} | {id(i) for body in later for i in body}
    outside = [i for i in sass.instructions if id(i) not in in_loops]
    warps = metadata.num_warps

    def global_bytes(instructions):
        return sum(access_bytes(i) * 32 * warps for i in instructions
                   if i.base in GLOBAL_MEMORY)

    # TMA boxes of the Triton IR's loops, matched to the SASS loops in order
    tma_bytes = descriptor_load_bytes(ttir) if ttir else []
    tma_bytes = tma_bytes if len(tma_bytes) == len(loops) else [0] * len(loops)
    mix = {"kernel": instruction_mix(sass.instructions),
           "main_loop": instruction_mix(inside) if loop else None,
           "main_loop_philox_rounds": philox_rounds(inside) if loop else 0.0,
           "main_loop_definition": "first innermost back-edge span holding HGMMA/HMMA, or "
                                   "FFMA where the Triton IR's dot loops run on the FMA pipes"}
    spill_instructions = sum(i.base in ("LDL", "STL") for i in sass.instructions)
    return KernelReport(
        name=name, arch=arch, regs=resources.get("REG", 0),
        spills=resources.get("STACK", 0) + resources.get("LOCAL", 0),
        spill_instructions=spill_instructions,
        shared_bytes=metadata.shared, num_warps=warps, num_stages=metadata.num_stages,
        wgmma=any(i.base == "HGMMA" for i in sass.instructions),
        tma=any(i.base == "UTMALDG" for i in sass.instructions), sass=mix,
        main_loop_instructions=len(inside), other_instructions=len(outside),
        loop_tensor_flops=sum(tensor_flops(i, warps) for i in inside),
        other_tensor_flops=sum(tensor_flops(i, warps) for i in outside),
        loop_global_bytes=global_bytes(inside) + (tma_bytes[0] if loop else 0),
        # the pipeline's prologue (cp.async of the first stages, before the loop) loads
        # tiles of iterations the loop's trip count already counts
        other_global_bytes=global_bytes([i for i in outside
                                         if not (loop and i.base == "LDGSTS")]),
        ttir=ttir,
        later_loops=[{"instructions": len(body),
                      "tensor_flops": sum(tensor_flops(i, warps) for i in body),
                      "global_bytes": global_bytes(body) + box_bytes,
                      "imads": sum(i.base == "IMAD" for i in body)}
                     for body, box_bytes in zip(later, tma_bytes[1:])])


_COMPILED = {}


def compile_launch(launch, arch):
    """KernelReport of a captured launch, compiled once per distinct launch in
    this process (Triton's on-disk cache keeps the builds across runs)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    key = (launch.compile_key(), arch)
    if key not in _COMPILED:
        src = ASTSource(fn=launch.fn, signature=launch.signature,
                        constexprs=launch.constexprs, attrs=launch.attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options=launch.options)
        _COMPILED[key] = analyse(launch.name, arch, compiled.metadata, compiled.asm["cubin"],
                                 compiled.asm["ttir"])
    return _COMPILED[key]
