"""Everything Loupe says to Kafka: the names it gives topics, groups and transactional ids
(``names``), its one admin client (``admin``), consumers and producers made with the
deployment's connection and security (``io``), the failure classes (``failures``), the
publisher of a batch's records and dead letters (``publisher``), topic creation (``topics``),
the reply-to rule (``reply_topics``), the ACLs (``acls``) and dropped collections' leftovers
(``leftovers``)."""
