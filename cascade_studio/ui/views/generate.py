"""The generate page (code in cascade_studio/ui/page_generate.py)."""
from cascade_studio.ui.page_generate import render

render()
