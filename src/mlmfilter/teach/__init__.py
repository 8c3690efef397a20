"""Teaching a judge: teacher labels, contrastive negatives and the data a student model trains on."""
