"""An inert pickle parser: the opcodes of a pickle become data, nothing is ever called.

`pickle.Unpickler` resolves GLOBAL opcodes to real callables and calls them for REDUCE, NEWOBJ
and BUILD; even with an allow-list, an allowed callable receives whatever arguments the file
chose. Here the pickle virtual machine is run with records in place of calls (docs/formats.md
§1): a GLOBAL becomes `Global(module, name)`, REDUCE / NEWOBJ / INST / OBJ become a `Call`
holding its callable record and arguments, BUILD, SETITEM(S) and APPEND(S) on such a call are
stored on it, and a persistent id becomes `PersistentId(pid)`. What the records mean is decided
afterwards by a typed interpreter (interpret.py) that knows the few shapes a checkpoint has.

Resources are bounded by the input: every length is checked against the bytes left, the memo is
a dict (a huge memo index costs nothing), byte strings are zero-copy views of the input, big
integers are capped, and the number of objects made is capped by a constant and the input size.
The parser is iterative, so nesting depth cannot exhaust the Python stack.
"""
from __future__ import annotations

import codecs
import struct
from dataclasses import dataclass, field

from ..errors import CheckpointError

MAX_INT_BYTES = 64          # LONG1/LONG4 and text integers: far more than any real checkpoint needs
MAX_OBJECTS = 20_000_000    # absolute cap on objects made by one pickle
# What parsing may allocate, in (approximate) bytes: MEMORY_FACTOR x the pickle's size + slack.
# Costs are charged per object made (a new list ~64 bytes, a record ~200, text its length).
MEMORY_FACTOR = 16
MEMORY_SLACK = 64 << 20
HASHABLE_DEPTH = 8
HASHABLE_NODES = 256   # items in one key, shared ones counted each time (_hashable)


@dataclass(frozen=True, slots=True)
class Global:
    """A GLOBAL / STACK_GLOBAL reference: only a name, never resolved."""

    module: str
    name: str

    @property
    def path(self) -> str:
        return f"{self.module}.{self.name}"


@dataclass(eq=False, slots=True)
class Call:
    """REDUCE / NEWOBJ / INST / OBJ of `func` with `args`, and what later opcodes did to the
    result: BUILD states, SETITEM(S) pairs, APPEND(S) items. Inert: nothing was called."""

    func: object
    args: tuple
    kind: str = "reduce"           # "reduce", "newobj" (NEWOBJ/NEWOBJ_EX/INST/OBJ)
    kwargs: dict | None = None
    states: list = field(default_factory=list)
    items: list = field(default_factory=list)    # (key, value) pairs
    appends: list = field(default_factory=list)


@dataclass(eq=False, slots=True)
class PersistentId:
    pid: object


class _Mark:
    __slots__ = ()


_MARK = _Mark()


class PickleParseError(CheckpointError):
    """The byte stream is not a pickle this reader accepts; message names the offset."""


def _hashable(value) -> bool:
    """A dict key, set item or frozenset item the reader accepts: None, a number, text, bytes,
    or tuples / frozensets of these, at most HASHABLE_DEPTH deep and HASHABLE_NODES items in
    all, counted with repetition. The count matters: tuples shared through the memo make a key
    whose tree is exponential in the pickle's size, and hash() walks that whole tree."""
    todo = [(value, 0)]
    nodes = 0
    while todo:
        v, depth = todo.pop()
        nodes += 1
        if v is None or isinstance(v, (bool, int, float, str, bytes)):
            continue
        if not isinstance(v, (tuple, frozenset)) or depth >= HASHABLE_DEPTH or nodes + len(v) > HASHABLE_NODES:
            return False
        todo.extend((x, depth + 1) for x in v)
    return True


def parse_pickle(data, start: int = 0, source: str = "<pickle>", max_objects: int | None = None):
    """Parse one pickle from `data` (bytes or memoryview) at `start` -> (records, end offset).

    Raises PickleParseError naming `source` and the byte offset for anything malformed,
    truncated or outside the bounds.
    """
    buf = memoryview(data).cast("B") if not isinstance(data, memoryview) else data
    n = len(buf)
    limit = MAX_OBJECTS if max_objects is None else max_objects
    mem_limit = MEMORY_FACTOR * (n - start) + MEMORY_SLACK
    mem = 0
    stack: list = []
    marks: list[int] = []
    memo: dict[int, object] = {}
    pos = start
    made = 0
    op_pos = start
    opname = "?"

    def fail(msg: str):
        raise PickleParseError(f"{source}: not a readable pickle (truncated or corrupt?) at byte {op_pos} "
                               f"({opname}): {msg}")

    def take(k: int) -> memoryview:
        nonlocal pos
        if k < 0 or pos + k > n:
            fail(f"needs {k} byte(s) but {n - pos} remain (truncated, or a length field is wrong)")
        out = buf[pos:pos + k]
        pos += k
        return out

    raw_bytes = data if isinstance(data, bytes) else None

    def line() -> bytes:
        nonlocal pos, raw_bytes
        if raw_bytes is None:
            raw_bytes = bytes(buf)  # once, only for the text opcodes of protocols 0-1
        end = raw_bytes.find(b"\n", pos)
        if end < 0:
            fail("unterminated text argument")
        out = raw_bytes[pos:end]
        pos = end + 1
        return out

    def pop():
        if not stack or stack[-1] is _MARK:
            fail("stack underflow")
        return stack.pop()

    def pop_mark() -> list:
        if not marks:
            fail("no MARK on the stack")
        k = marks.pop()
        items = stack[k + 1:]
        del stack[k:]
        if any(x is _MARK for x in items):
            fail("nested MARK inside a marked sequence")
        return items

    def push(v, cost: int = 8):
        nonlocal made, mem
        made += 1
        mem += cost
        if made > limit or mem > mem_limit:
            fail(f"it would take more than {mem_limit:,} bytes ({made:,} objects) to parse, far more than a "
                 "file of this size needs; refusing")
        stack.append(v)

    def charge(cost: int):
        nonlocal mem
        mem += cost
        if mem > mem_limit:
            fail(f"it would take more than {mem_limit:,} bytes to parse; refusing")

    def top():
        if not stack or stack[-1] is _MARK:
            fail("stack underflow")
        return stack[-1]

    def text(raw) -> str:
        try:
            return bytes(raw).decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            fail("invalid UTF-8 text")

    def number(raw: bytes, what: str) -> int:
        if len(raw) > MAX_INT_BYTES * 3:
            fail(f"{what} of {len(raw)} digits is too large")
        try:
            return int(raw.rstrip(b"L"), 0 if raw[:2] in (b"0x", b"0X") else 10)
        except ValueError:
            fail(f"bad {what} {raw[:40]!r}")

    def setitem(target, key, value):
        if isinstance(target, dict):
            if not _hashable(key):
                fail(f"dictionary key of type {type(key).__name__} is not allowed (keys are None, numbers, "
                     f"text, bytes, or tuples of them: at most {HASHABLE_DEPTH} deep, {HASHABLE_NODES} items)")
            target[key] = value
        elif isinstance(target, Call):
            target.items.append((key, value))
        else:
            fail(f"SETITEM on a {type(target).__name__}")

    def append(target, values):
        if isinstance(target, list):
            target.extend(values)
        elif isinstance(target, Call):
            target.appends.extend(values)
        else:
            fail(f"APPEND on a {type(target).__name__}")

    def memo_put(idx: int):
        if idx < 0:
            fail("negative memo index")
        if len(memo) >= limit and idx not in memo:
            fail("memo too large")
        charge(100)
        memo[idx] = top()

    def memo_get(idx: int):
        if idx not in memo:
            fail(f"memo index {idx} was never stored")
        push(memo[idx])

    def make_global(module, name):
        if not isinstance(module, str) or not isinstance(name, str):
            fail("STACK_GLOBAL needs two strings")
        if len(module) > 256 or len(name) > 256:
            fail("global name too long")
        push(Global(module, name), 150 + len(module) + len(name))

    while True:
        op_pos = pos
        if pos >= n:
            fail("ends before STOP (truncated)")
        op = buf[pos]
        pos += 1
        c = chr(op)
        opname = _NAMES.get(op, f"0x{op:02x}")
        if c == "\x80":                       # PROTO
            proto = take(1)[0]
            if proto > 5:
                fail(f"unsupported protocol {proto}")
        elif c == "\x95":                     # FRAME: framing is only a hint
            (size,) = struct.unpack("<Q", take(8))
            if size > n - pos:
                fail("frame longer than the data")
        elif c == ".":                        # STOP
            if len(stack) != 1 or marks:
                fail("STOP with a malformed stack")
            return stack[0], pos
        elif c == "(":
            marks.append(len(stack))
            stack.append(_MARK)
        elif c == "0":
            pop()
        elif c == "1":
            pop_mark()
        elif c == "2":
            push(top())
        elif c == "N":
            push(None)
        elif c == "\x88":
            push(True)
        elif c == "\x89":
            push(False)
        elif c == "I":
            raw = line()
            push(True if raw == b"01" else False if raw == b"00" else number(raw, "integer"))
        elif c == "L":
            push(number(line(), "long"))
        elif c == "J":
            push(struct.unpack("<i", take(4))[0])
        elif c == "K":
            push(take(1)[0])
        elif c == "M":
            push(struct.unpack("<H", take(2))[0])
        elif c in "\x8a\x8b":                 # LONG1 / LONG4
            k = take(1)[0] if c == "\x8a" else struct.unpack("<i", take(4))[0]
            if k < 0 or k > MAX_INT_BYTES:
                fail(f"integer of {k} bytes is too large")
            push(int.from_bytes(take(k), "little", signed=True), 40 + k)
        elif c == "F":
            raw = line()
            try:
                push(float(raw))
            except ValueError:
                fail(f"bad float {raw[:40]!r}")
        elif c == "G":
            push(struct.unpack(">d", take(8))[0])
        elif c in "STU":                      # STRING / BINSTRING / SHORT_BINSTRING (py2 str)
            if c == "S":
                raw = line()
                if len(raw) < 2 or raw[:1] != raw[-1:] or raw[:1] not in (b"'", b'"'):
                    fail("STRING argument is not quoted")
                try:
                    value = codecs.escape_decode(raw[1:-1])[0]
                except ValueError:
                    fail("bad STRING escape")
            else:
                k = struct.unpack("<i", take(4))[0] if c == "T" else take(1)[0]
                value = bytes(take(k))
            push(value.decode("latin1"), 64 + len(value))  # as Unpickler(encoding="latin1")
        elif c in "BC\x8e":                   # BINBYTES / SHORT_BINBYTES / BINBYTES8
            k = {"B": lambda: struct.unpack("<I", take(4))[0], "C": lambda: take(1)[0],
                 "\x8e": lambda: struct.unpack("<Q", take(8))[0]}[c]()
            push(take(k), 200)                # a view of the input: no copy
        elif c == "\x96":                     # BYTEARRAY8
            push(take(struct.unpack("<Q", take(8))[0]), 200)
        elif c == "V":
            raw = line()
            try:
                push(raw.decode("raw-unicode-escape"))
            except UnicodeDecodeError:
                fail("bad UNICODE argument")
        elif c in "X\x8c\x8d":                # BINUNICODE / SHORT_BINUNICODE / BINUNICODE8
            k = {"X": lambda: struct.unpack("<I", take(4))[0], "\x8c": lambda: take(1)[0],
                 "\x8d": lambda: struct.unpack("<Q", take(8))[0]}[c]()
            raw = take(k)
            push(text(raw), 64 + len(raw))
        elif c == ")":
            push(())
        elif c == "t":
            items = pop_mark()
            push(tuple(items), 64 + 8 * len(items))
        elif c in "\x85\x86\x87":
            k = ord(c) - 0x84
            if len(stack) - (marks[-1] + 1 if marks else 0) < k:
                fail("stack underflow")
            items = tuple(stack[-k:])
            del stack[-k:]
            push(items, 64)
        elif c == "]":
            push([], 64)
        elif c == "l":
            items = pop_mark()
            push(list(items), 64 + 8 * len(items))
        elif c == "}":
            push({}, 64)
        elif c == "d":
            items = pop_mark()
            if len(items) % 2:
                fail("DICT with an odd number of items")
            d: dict = {}
            for i in range(0, len(items), 2):
                setitem(d, items[i], items[i + 1])
            push(d, 64 + 50 * len(items))
        elif c == "\x8f":
            push(set(), 200)
        elif c == "\x90":                     # ADDITEMS
            items = pop_mark()
            target = top()
            if not isinstance(target, set) or not all(_hashable(x) for x in items):
                fail("ADDITEMS needs a set and hashable items")
            charge(50 * len(items))
            target.update(items)
        elif c == "\x91":                     # FROZENSET
            items = pop_mark()
            if not all(_hashable(x) for x in items):
                fail("unhashable frozenset item")
            push(frozenset(items), 200 + 50 * len(items))
        elif c == "a":
            value = pop()
            charge(16)
            append(top(), [value])
        elif c == "e":
            items = pop_mark()
            charge(16 * len(items))
            append(top(), items)
        elif c == "s":
            value = pop()
            key = pop()
            charge(50)
            setitem(top(), key, value)
        elif c == "u":
            items = pop_mark()
            if len(items) % 2:
                fail("SETITEMS with an odd number of items")
            target = top()
            charge(25 * len(items))
            for i in range(0, len(items), 2):
                setitem(target, items[i], items[i + 1])
        elif c == "c":                        # GLOBAL "module\nname\n"
            module = line().decode("utf-8", "replace")
            name = line().decode("utf-8", "replace")
            make_global(module, name)
        elif c == "\x93":                     # STACK_GLOBAL
            name = pop()
            module = pop()
            make_global(module, name)
        elif c == "R":                        # REDUCE
            args = pop()
            func = pop()
            if not isinstance(args, tuple):
                fail("REDUCE arguments are not a tuple")
            push(Call(func, args), 200)
        elif c == "\x81":                     # NEWOBJ
            args = pop()
            cls = pop()
            if not isinstance(args, tuple):
                fail("NEWOBJ arguments are not a tuple")
            push(Call(cls, args, kind="newobj"), 200)
        elif c == "\x92":                     # NEWOBJ_EX
            kwargs = pop()
            args = pop()
            cls = pop()
            if not isinstance(args, tuple) or not isinstance(kwargs, dict):
                fail("NEWOBJ_EX needs a tuple and a dict")
            push(Call(cls, args, kind="newobj", kwargs=kwargs), 200)
        elif c == "i":                        # INST "module\nname\n" with marked args
            module = line().decode("utf-8", "replace")
            name = line().decode("utf-8", "replace")
            args = tuple(pop_mark())
            push(Call(Global(module, name), args, kind="newobj"), 400)
        elif c == "o":                        # OBJ: cls and args after the mark
            items = pop_mark()
            if not items:
                fail("OBJ without a class")
            push(Call(items[0], tuple(items[1:]), kind="newobj"), 200)
        elif c == "b":                        # BUILD
            state = pop()
            target = top()
            if not isinstance(target, Call):
                fail(f"BUILD on a {type(target).__name__}")
            if len(target.states) >= 4:
                fail("too many BUILD states for one object")
            charge(16)
            target.states.append(state)
        elif c == "P":
            push(PersistentId(line().decode("ascii", "replace")), 100)
        elif c == "Q":
            push(PersistentId(pop()), 100)
        elif c == "p":
            memo_put(number(line(), "memo index"))
        elif c == "q":
            memo_put(take(1)[0])
        elif c == "r":
            memo_put(struct.unpack("<I", take(4))[0])
        elif c == "\x94":                     # MEMOIZE
            memo_put(len(memo))
        elif c == "g":
            memo_get(number(line(), "memo index"))
        elif c == "h":
            memo_get(take(1)[0])
        elif c == "j":
            memo_get(struct.unpack("<I", take(4))[0])
        elif c in "\x82\x83\x84":
            fail("extension-registry opcodes (EXT1/2/4) are not used by checkpoints")
        elif c in "\x97\x98":
            fail("out-of-band buffers (protocol 5) are not used by checkpoints")
        else:
            fail(f"unknown opcode 0x{op:02x}")


_NAMES = {ord(k): v for k, v in {
    "(": "MARK", ".": "STOP", "0": "POP", "1": "POP_MARK", "2": "DUP", "F": "FLOAT", "I": "INT", "J": "BININT",
    "K": "BININT1", "L": "LONG", "M": "BININT2", "N": "NONE", "P": "PERSID", "Q": "BINPERSID", "R": "REDUCE",
    "S": "STRING", "T": "BINSTRING", "U": "SHORT_BINSTRING", "V": "UNICODE", "X": "BINUNICODE", "a": "APPEND",
    "b": "BUILD", "c": "GLOBAL", "d": "DICT", "}": "EMPTY_DICT", "e": "APPENDS", "g": "GET", "h": "BINGET",
    "i": "INST", "j": "LONG_BINGET", "l": "LIST", "]": "EMPTY_LIST", "o": "OBJ", "p": "PUT", "q": "BINPUT",
    "r": "LONG_BINPUT", "s": "SETITEM", "t": "TUPLE", ")": "EMPTY_TUPLE", "u": "SETITEMS", "G": "BINFLOAT",
    "\x80": "PROTO", "\x81": "NEWOBJ", "\x82": "EXT1", "\x83": "EXT2", "\x84": "EXT4", "\x85": "TUPLE1",
    "\x86": "TUPLE2", "\x87": "TUPLE3", "\x88": "NEWTRUE", "\x89": "NEWFALSE", "\x8a": "LONG1", "\x8b": "LONG4",
    "B": "BINBYTES", "C": "SHORT_BINBYTES", "\x8c": "SHORT_BINUNICODE", "\x8d": "BINUNICODE8",
    "\x8e": "BINBYTES8", "\x8f": "EMPTY_SET", "\x90": "ADDITEMS", "\x91": "FROZENSET", "\x92": "NEWOBJ_EX",
    "\x93": "STACK_GLOBAL", "\x94": "MEMOIZE", "\x95": "FRAME", "\x96": "BYTEARRAY8", "\x97": "NEXT_BUFFER",
    "\x98": "READONLY_BUFFER",
}.items()}
