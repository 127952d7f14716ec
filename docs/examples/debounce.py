from celery_unique import UniqueTask
from proj.celery import app
from proj.services import save_draft


@app.task(base=UniqueTask, queueing_lock="draft_{document_id}", debounce=2, debounce_max=30)
def autosave(document_id, text):
    """Save a draft 2 s after the last edit, and at least every 30 s while editing."""
    save_draft(document_id, text)
