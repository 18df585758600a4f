"""The one error type users see: a message that names what is at fault."""

from __future__ import annotations


class QCError(Exception):
    """A user-facing error. The CLI prints it as one line and exits non-zero.

    Each keyword names the thing at fault so the line tells the user where to look:
    ``file`` (a path, optionally ``path:key`` for config files), ``node`` (an ONNX node name),
    ``pass_name`` (a pipeline pass) and ``option`` (a pass or CLI option).
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        node: str | None = None,
        pass_name: str | None = None,
        option: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.file = file
        self.node = node
        self.pass_name = pass_name
        self.option = option

    def __str__(self) -> str:
        where = []
        if self.file:
            where.append(str(self.file))
        if self.pass_name:
            where.append(f"pass '{self.pass_name}'")
        if self.option:
            where.append(f"option '{self.option}'")
        if self.node:
            where.append(f"node '{self.node}'")
        prefix = ": ".join(where)
        return f"{prefix}: {self.message}" if prefix else self.message
