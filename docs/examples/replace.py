from celery_unique import UniqueTask
from proj.celery import app
from proj.services import rebuild_index


@app.task(base=UniqueTask, queueing_lock="index_{document_id}", on_duplicate="replace")
def reindex(document_id, revision):
    """Rebuild a document's search index once, for the newest revision asked for."""
    rebuild_index(document_id, revision)


@app.task(base=UniqueTask, queueing_lock="index_{document_id}", on_duplicate="replace",
          lock="index_{document_id}")
def reindex_latest(document_id, revision):
    """One rebuild running, and at most one waiting: the newest revision asked for."""
    rebuild_index(document_id, revision)
