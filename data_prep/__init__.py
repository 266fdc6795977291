"""l2a_data_prep: built-in corpora, tokenization and packing into training shards."""
