"""Document Q&A: ingestion, chunking, retrieval, budgeted context, cited answers."""
