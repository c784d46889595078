"""Regenerate the option table between the README's options markers: python scripts/update_readme_options.py"""
import re
import sys
from pathlib import Path

from fairseq_moec.models.options import options_markdown

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"(<!-- options:begin -->\n).*?(<!-- options:end -->)", re.S)


def render(text: str) -> str:
    return BLOCK.sub(lambda m: m.group(1) + options_markdown() + m.group(2), text)


if __name__ == "__main__":
    text = README.read_text(encoding="utf-8")
    if "--check" in sys.argv:
        sys.exit(0 if render(text) == text else "README option table is stale: run scripts/update_readme_options.py")
    README.write_text(render(text), encoding="utf-8")
