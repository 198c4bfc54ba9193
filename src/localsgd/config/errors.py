"""The one error type every bad recipe, override or launch ends in."""

from __future__ import annotations


class ConfigError(Exception):
    """All problems found in a recipe, each naming its full dotted key and the fix."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__(self.format())

    def format(self) -> str:
        lines = "\n".join(f"  - {one_line(p)}" for p in self.problems)
        noun = "problem" if len(self.problems) == 1 else "problems"
        return f"Recipe is not valid ({len(self.problems)} {noun}):\n{lines}"


def one_line(text: str) -> str:
    """``text`` with control characters escaped: a key or value typed with a newline (or
    any line break) in it still makes one line per problem."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class ConfigWarning(UserWarning):
    """A recipe key that has no effect with the chosen parts (it is ignored)."""
