"""The export page (code in cascade_studio/ui/page_export.py)."""
from cascade_studio.ui.page_export import render

render()
