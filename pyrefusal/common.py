"""Small types shared by every layer (foundation: imports nothing of pyrefusal)."""

from __future__ import annotations

from collections.abc import Callable

#: A progress-message sink: ``print``, ``click.echo`` or a list's ``append``.
Log = Callable[[str], None]

#: A progress callback ``(stage, done, total)``, e.g. one tqdm bar per stage.
Progress = Callable[[str, int, int], None]
