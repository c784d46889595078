"""Regenerate the option table between the options markers of docs/method.md: python scripts/update_option_table.py"""

import re
import sys
from pathlib import Path

from fairseq_moec.models.options import options_markdown

TABLE_DOC = Path(__file__).resolve().parents[1] / "docs" / "method.md"
BLOCK = re.compile(r"(<!-- options:begin -->\n).*?(<!-- options:end -->)", re.S)


def render(text: str) -> str:
    return BLOCK.sub(lambda m: m.group(1) + options_markdown() + m.group(2), text)


if __name__ == "__main__":
    text = TABLE_DOC.read_text(encoding="utf-8")
    if "--check" in sys.argv:
        stale = "docs/method.md option table is stale: run scripts/update_option_table.py"
        sys.exit(0 if render(text) == text else stale)
    TABLE_DOC.write_text(render(text), encoding="utf-8")
