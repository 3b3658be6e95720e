"""python -m attn.export"""

from attn.export import run

run()
