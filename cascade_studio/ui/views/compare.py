"""The compare page (code in cascade_studio/ui/page_compare.py)."""
from cascade_studio.ui.page_compare import render

render()
