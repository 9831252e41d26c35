"""Chat rows: their two layouts, the role names they may use, and where a bad row lives.

Layouts (per message): OpenAI's `{role, content}` (the `messages` column) and ShareGPT's
`{from, value}` (the `conversations` column). Both become `{role, content}` messages, with each
role renamed by `data.chat.roles` (e.g. ShareGPT's human -> user, gpt -> assistant).

The roles rule. A role the chat template does not know is refused with one line: it would be
trained as something nobody chose (a misspelled "assistent" is rendered as text and carries no
loss, or the template drops the message). Which roles a template knows is learned by rendering it
(RoleRule): a probe conversation whose last message has the role and a marker as its content.
The role is known when one of the probes renders without raising and the marker shows in the
output. Templates handle an unknown role in one of three ways:
- they raise (`raise_exception(...)`, or an error on a dict lookup): the probe fails;
- they skip the message (an if/elif over known roles without an else): the marker is missing;
- they print the role's name whatever it is (ChatML's `<|im_start|>{{ role }}`, Llama 3's
  header): every probe succeeds, so rendering says nothing. Such a template is recognised by
  rendering a name no template knows; it then takes the standard roles (system, user,
  assistant, tool) and the names it mentions as string literals (Llama 3.1 compares the role
  to "ipython"), those that render.
A tokenizer without a chat template takes the standard roles.
"""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path
from typing import Callable, Optional

from qat.errors import UserError

STANDARD_ROLES = ("system", "user", "assistant", "tool")
LAYOUTS = (("role", "content"), ("from", "value"))  # OpenAI, ShareGPT
KNOWN_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}
_MARK = "qat-role-probe-7d41"
_NO_SUCH_ROLE = "qat-no-such-role"
_CONTEXTS = ((), ({"role": "user", "content": "hi"},),
             ({"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}))


def message_keys(m: dict) -> tuple[str, str]:
    """The (role, content) keys of a message: ShareGPT's when it has a `from` and no `role` (Arrow
    gives every message of a column every key, None where a row lacks it), else OpenAI's."""
    return LAYOUTS[1] if m.get("role") is None and m.get("from") is not None else LAYOUTS[0]


def normalize(messages: list[dict], roles: dict) -> list[dict]:
    """{role, content} messages (other keys kept), with the roles renamed by `roles`."""
    out = []
    for m in messages:
        role_key, content_key = message_keys(m)
        rest = {k: v for k, v in m.items() if k not in (*LAYOUTS[0], *LAYOUTS[1])}
        role = m.get(role_key)
        out.append({**rest, "role": roles.get(role, role), "content": m.get(content_key)})
    return out


_NAME = r"""(['"])([A-Za-z_][\w-]*)\1"""


def compared_names(template: str) -> set[str]:
    """The names a template compares something to: `x == 'name'`, `'name' != x`, `x in ['a', 'b']`
    (a subscript such as m['role'] is no such name)."""
    names = {m[1] for m in re.findall(r"(?:==|!=)\s*" + _NAME, template)}
    names |= {m[1] for m in re.findall(_NAME + r"\s*(?:==|!=)", template)}
    for group in re.findall(r"\bin\s*[\[(]([^\])]*)[\])]", template):
        names |= {m[1] for m in re.findall(_NAME, group)}
    return names


class RoleRule:
    """Which role names the tokenizer's chat template takes, learned by rendering it (see above)."""

    def __init__(self, tokenizer, roles: dict):
        self.tokenizer, self.roles = tokenizer, dict(roles)
        template = tokenizer.chat_template
        self.template = "\n".join(template.values()) if isinstance(template, dict) else template
        self._known: dict[str, bool] = {}
        self.prints_any_role = self.template is not None and self._renders(_NO_SUCH_ROLE)
        self.candidates = list(STANDARD_ROLES) + sorted(compared_names(self.template or "") - set(STANDARD_ROLES))
        # A template that renders none of the standard roles is broken, not strict: keep the standard
        # names, and its own error comes when the rows are rendered (tokenize_chat).
        self.broken = self.template is not None and not any(self._renders(r) for r in STANDARD_ROLES)

    def _renders(self, role: str) -> bool:
        for context in _CONTEXTS:
            try:
                text = self.tokenizer.apply_chat_template([*context, {"role": role, "content": _MARK}],
                                                          tokenize=False)
            except Exception:  # the template raised (jinja's TemplateError, or a lookup it did not guard)
                continue
            if isinstance(text, str) and _MARK in text:
                return True
        return False

    def accepts(self, role) -> bool:
        """Whether `role` (a name after data.chat.roles) may be trained."""
        if not isinstance(role, str):
            return False
        if role not in self._known:
            if self.template is None or self.broken:
                self._known[role] = role in STANDARD_ROLES
            elif self.prints_any_role:
                self._known[role] = role in self.candidates and self._renders(role)
            else:
                self._known[role] = self._renders(role)
        return self._known[role]

    def accepted(self) -> list[str]:
        """The names to offer in an error line: the standard ones and the template's literals it takes."""
        return [r for r in self.candidates if self.accepts(r)] or list(STANDARD_ROLES)

    def refusal(self, where: str, raw) -> str:
        """The error line for the raw role name `raw` found at `where`."""
        names = self.accepted()
        if raw is None:
            return (f"{where}: a message has no role (no 'role' or 'from' key); fix the row")
        mapped = self.roles.get(raw, raw)
        whose = "the tokenizer's chat template" if self.template is not None else "a tokenizer without a chat template"
        if mapped != raw:
            return (f"{where}: role {raw!r}, mapped by data.chat.roles onto {mapped!r}, is not a role {whose} "
                    f"takes ({', '.join(names)}); map {raw!r} onto one of those in data.chat.roles")
        guess = KNOWN_ALIASES.get(str(raw).lower()) or next(iter(difflib.get_close_matches(str(raw), names, 1)), None)
        example = f"{{{raw}: {guess}}}" if guess in names else f"{{{raw}: <one of them>}}"
        return (f"{where}: role {raw!r} is not a role {whose} takes ({', '.join(names)}); fix the row, or map "
                f"the name with data.chat.roles (e.g. data.chat.roles={example})")


def check_row(messages: list, rule: RoleRule, where: Callable[[], str]) -> None:
    """One conversation's roles (raw names, before the mapping) against the rule; `where` names the
    row, called only for the error line (finding a row's file and line reads the files)."""
    for m in messages:
        if not isinstance(m, dict):
            raise UserError(f"{where()}: a message is {type(m).__name__}, not a {{role, content}} mapping; "
                            f"fix the row")
        raw = m.get(message_keys(m)[0])
        if not rule.accepts(rule.roles.get(raw, raw)):
            raise UserError(rule.refusal(where(), raw))


def first_refused(table, column: str, rule: RoleRule) -> Optional[tuple[int, object]]:
    """(row, raw role) of the first message the rule refuses in an Arrow table's chat column, or None.

    Reads the role field of every message with pyarrow (the distinct names, then the first row
    holding a refused one), so that a corpus is checked without a Python object per message."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    base = 0
    for chunk in table.column(column).chunks:
        structs = chunk.flatten()
        names = [f.name for f in structs.type]
        fields = [structs.field(k) for k in ("role", "from") if k in names]
        roles = fields[0] if len(fields) == 1 else pc.coalesce(*fields) if fields else pa.nulls(len(structs), pa.string())
        bad = [r for r in pc.unique(roles).to_pylist() if not rule.accepts(rule.roles.get(r, r))]
        if bad:
            hits = pc.is_in(roles, value_set=pa.array([r for r in bad if r is not None], pa.string()))
            if None in bad:
                hits = pc.or_kleene(pc.fill_null(hits, False), pc.is_null(roles))
            first = pc.index(pc.fill_null(hits, False), True).as_py()
            offsets = chunk.offsets.to_numpy() - chunk.offsets[0].as_py()
            row = int(np.searchsorted(offsets, first, side="right") - 1)
            return base + row, roles[first].as_py()
        base += len(chunk)
    return None


def row_location(files: list[Path], row: int) -> str:
    """Where row `row` (0-based, the files read one after another) is: the file and its 1-based line
    for JSON lines, the file and the 0-based row index for other formats."""
    for f in files:
        n, line = _rows_of(f, row)
        if line is not None:
            return f"{f} {line}"
        row -= n
    return f"row {row} past the end of {files[-1]}"


def _rows_of(path: Path, row: int) -> tuple[int, Optional[str]]:
    """(rows in the file, where row `row` of it is or None when the file has fewer rows)."""
    if path.suffix in (".json", ".jsonl") and not _is_json_array(path):
        n = 0
        with open(path, "rb") as f:
            for number, text in enumerate(f, 1):
                if text.strip():  # datasets' JSON-lines reader skips blank lines
                    if n == row:
                        return n, f"line {number}"
                    n += 1
        return n, None
    n = _count_rows(path)
    return (n, f"row {row} (0-based)") if row < n else (n, None)


def _is_json_array(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    return head.startswith(b"[")


def _count_rows(path: Path) -> int:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    if path.suffix == ".json":
        return len(json.loads(path.read_text()))
    import pyarrow.csv as pcsv

    return pcsv.read_csv(path).num_rows
