"""Cascade Studio: the Streamlit app (``cascade-studio ui`` starts it with ``$CASCADE_STUDIO_WORKSPACE``).

Pages live in ``views/`` (two-line scripts) and their code in ``page_*.py``. Training, comparisons and exports
run as separate processes (``jobs.py``, ``runner.py``); this process never imports torch, so a crashed or
killed job can only ever show up here as a failed job.
"""
import streamlit as st

from cascade_studio.ui.common import PAGES, sidebar_status, start_queue_worker, workspace
from cascade_studio.ui.workspace import ensure_repo_cwd

st.set_page_config(page_title="Cascade Studio", layout="wide")
ensure_repo_cwd()

TITLES = {"recipes": "Recipes", "data": "Data", "launch": "Launch", "runs": "Runs", "compare": "Compare",
          "generate": "Generate", "export": "Export"}
navigation = st.navigation([st.Page(PAGES[key], title=title, url_path=key, default=key == "recipes")
                            for key, title in TITLES.items()])
start_queue_worker()

with st.sidebar:
    ws = workspace()
    st.caption(f"Workspace: `{ws.root}`")
    sidebar_status()  # refreshes itself every few seconds on every page; toasts when a job ends

navigation.run()
