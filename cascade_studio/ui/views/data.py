"""The data page (code in cascade_studio/ui/page_data.py)."""
from cascade_studio.ui.page_data import render

render()
