"""The launch page (code in cascade_studio/ui/page_launch.py)."""
from cascade_studio.ui.page_launch import render

render()
