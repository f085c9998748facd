//! The ledger, inbox and record operations of [`SqlStore`], and the store
//! traits over them.

// One module in two files: the parent's private items are this file's too.
#[allow(clippy::wildcard_imports)]
use super::*;

impl<D: Dialect> SqlStore<D> {
    /// Locks the entry in `tx` and reads the database's clock after the lock
    /// is held.
    pub(super) async fn lock_entry(
        &self,
        tx: &mut D::Conn,
        key: &EventKey,
    ) -> Result<Option<(LedgerEntry, OffsetDateTime)>, Fail> {
        let Some(row) = D::fetch_optional(tx, &self.sql.lock_entry, key_args(key)).await? else {
            return Ok(None);
        };
        Ok(Some((
            Self::entry_from_row(&row)?,
            Self::req_time(&row, "now")?,
        )))
    }

    /// Inserts a processing entry for `request` if there is none (the
    /// primary key arbitrates a race); its lease, or `None` when the entry
    /// exists.
    pub(super) async fn insert_claim(
        &self,
        conn: &mut D::Conn,
        request: &ClaimRequest,
    ) -> Result<Option<Lease>, Fail> {
        let token = self.token_arg(&mut *conn).await?;
        let mut args = key_args(&request.key);
        args.extend([
            Arg::Str(&request.event_type),
            Arg::Int(request.event_created),
            Arg::Bytes(&request.fingerprint.0[..]),
            Arg::Int(lease_micros(request.lease)),
        ]);
        args.extend(token);
        let Some(row) = D::fetch_optional(conn, &self.sql.claim_insert, args).await? else {
            return Ok(None);
        };
        Ok(Some(Self::lease_from_row(&row, &request.key, 1)?))
    }

    /// The lease a claim statement returned (`lease_token`,
    /// `lease_expires_at` and the `updated_at` it was granted at): the time
    /// left is measured on the database's clock.
    fn lease_from_row(row: &D::Row, key: &EventKey, attempt: u32) -> Result<Lease, Fail> {
        let expires_at = Self::req_time(row, "lease_expires_at")?;
        let granted_at = Self::req_time(row, "updated_at")?;
        Ok(Lease {
            key: key.clone(),
            token: Self::token_of(D::int(row, "lease_token")?)?,
            attempt,
            expires_at,
            remaining: expires_at - granted_at,
        })
    }

    pub(super) async fn claim_once(&self, request: &ClaimRequest) -> Result<ClaimOutcome, Fail> {
        for _ in 0..3 {
            if self.sql.next_token.is_none() {
                // The token comes from inside the statement: a new event is
                // claimed in one statement, without a transaction.
                let mut conn = D::acquire(&self.pool).await?;
                if let Some(lease) = self.insert_claim(&mut conn, request).await? {
                    return Ok(ClaimOutcome::Claimed(lease));
                }
                // The entry exists: a redelivery of a settled event (Stripe's
                // retries, the reconciler's catch-up) or a conflicting
                // payload is answered from a plain read on this connection,
                // without a transaction or a lock.
                if let Some(outcome) = self.unlocked_answer(&mut conn, request).await? {
                    return Ok(outcome);
                }
            }
            let mut tx = D::begin(&self.pool).await?;
            let Some((entry, now)) = self.lock_entry(&mut tx, &request.key).await? else {
                // No entry (or pruned in between): insert one.
                let lease = self.insert_claim(&mut tx, request).await?;
                D::commit(tx).await?;
                match lease {
                    Some(lease) => return Ok(ClaimOutcome::Claimed(lease)),
                    None => continue,
                }
            };
            let outcome = self
                .apply_decision(&mut tx, &entry, request, now, None)
                .await?;
            D::commit(tx).await?;
            return Ok(outcome.unwrap_or(ClaimOutcome::InFlight { until: now }));
        }
        Err(other(format!("{} claim: the entry kept changing", D::NAME)))
    }

    /// The claim's outcome when it needs no lock: [`decide_claim`] answers
    /// `Conflict` for an entry with another fingerprint and `Duplicate` for
    /// a settled one (processed, ignored, dead) whatever its lease, and the
    /// committed row gives that answer as of this read (a lock would only
    /// wait for a concurrent writer first: a requeue of a dead event, or a
    /// prune). `None` when the entry is gone or unsettled: then the row
    /// must be locked and decided.
    async fn unlocked_answer(
        &self,
        conn: &mut D::Conn,
        request: &ClaimRequest,
    ) -> Result<Option<ClaimOutcome>, Fail> {
        let Some(row) = D::fetch_optional(conn, &self.sql.state_of, key_args(&request.key)).await?
        else {
            return Ok(None);
        };
        let (state, stored) = Self::state_and_fingerprint(&row)?;
        Ok(if stored != request.fingerprint {
            Some(ClaimOutcome::Conflict { stored })
        } else if state.is_settled() {
            Some(ClaimOutcome::Duplicate { state })
        } else {
            None
        })
    }

    /// Applies [`decide_claim`] to a locked entry. With `subscription`, the
    /// write happens only if no other event of it holds a live lease
    /// (`None` returned otherwise).
    pub(super) async fn apply_decision(
        &self,
        conn: &mut D::Conn,
        entry: &LedgerEntry,
        request: &ClaimRequest,
        now: OffsetDateTime,
        subscription: Option<&str>,
    ) -> Result<Option<ClaimOutcome>, Fail> {
        let key = &request.key;
        Ok(
            match decide_claim(Some(entry), &request.fingerprint, now, request.max_attempts) {
                ClaimDecision::Insert => {
                    return Err(other(format!("{} claim: entry vanished", D::NAME)));
                }
                ClaimDecision::Reclaim { attempt } => {
                    let token = self.token_arg(&mut *conn).await?;
                    let mut args = key_args(key);
                    args.extend([
                        Arg::Int(i64::from(attempt)),
                        Arg::Time(expiry(now, request.lease)),
                        Arg::Time(now),
                        Arg::OptStr(subscription),
                    ]);
                    args.extend(token);
                    match D::fetch_optional(conn, &self.sql.reclaim, args).await? {
                        Some(row) => Some(ClaimOutcome::Claimed(Self::lease_from_row(
                            &row, key, attempt,
                        )?)),
                        None => None,
                    }
                }
                ClaimDecision::ExpireToDead => {
                    let message = format!(
                        "lease expired on attempt {} of {}: the worker never finished",
                        entry.attempts, request.max_attempts
                    );
                    let mut args = key_args(key);
                    args.extend([
                        Arg::Str(&message),
                        Arg::Int(0),
                        Arg::Time(now),
                        Arg::OptStr(subscription),
                    ]);
                    let n = D::execute(conn, &self.sql.expire_to_dead, args).await?;
                    (n > 0).then_some(ClaimOutcome::DeadLettered {
                        attempts: entry.attempts,
                    })
                }
                ClaimDecision::Duplicate(state) => Some(ClaimOutcome::Duplicate { state }),
                ClaimDecision::InFlight { until } => Some(ClaimOutcome::InFlight { until }),
                ClaimDecision::Conflict => Some(ClaimOutcome::Conflict {
                    stored: entry.fingerprint,
                }),
            },
        )
    }

    pub(super) async fn fail_once(
        &self,
        lease: &Lease,
        failure: &Failure,
    ) -> Result<FailOutcome, Fail> {
        let mut tx = D::begin(&self.pool).await?;
        let (entry, now) = self
            .lock_entry(&mut tx, &lease.key)
            .await?
            .ok_or_else(not_found)?;
        check_fence(&entry, lease).map_err(lease_lost)?;
        let state = state_after_failure(entry.attempts, failure.max_attempts, failure.retryable);
        let mut args = key_args(&lease.key);
        args.extend([
            Arg::Str(state.as_str()),
            Arg::Str(&failure.error),
            Arg::OptStr(failure.payload.as_deref()),
            Arg::Time(now),
        ]);
        D::execute(&mut tx, &self.sql.fail, args).await?;
        D::commit(tx).await?;
        Ok(match state {
            LedgerState::Dead => FailOutcome::Dead {
                attempts: entry.attempts,
            },
            _ => FailOutcome::Failed {
                attempts: entry.attempts,
            },
        })
    }

    pub(super) async fn release_once(&self, lease: &Lease) -> Result<(), Fail> {
        let token = Self::to_i64(lease.token.0, "lease token")?;
        let mut conn = D::acquire(&self.pool).await?;
        for _ in 0..3 {
            let mut args = key_args(&lease.key);
            args.push(Arg::Int(token));
            if D::execute(&mut conn, &self.sql.release, args).await? > 0 {
                return Ok(());
            }
            let entry = self
                .get_on(&mut conn, &lease.key)
                .await?
                .ok_or_else(not_found)?;
            check_fence(&entry, lease).map_err(lease_lost)?;
        }
        Err(other(format!(
            "{} release: the entry kept changing",
            D::NAME
        )))
    }

    pub(super) async fn renew_once(
        &self,
        lease: &Lease,
        lease_for: Duration,
    ) -> Result<Lease, Fail> {
        let token = Self::to_i64(lease.token.0, "lease token")?;
        let mut conn = D::acquire(&self.pool).await?;
        let mut args = key_args(&lease.key);
        args.extend([Arg::Int(token), Arg::Int(lease_micros(lease_for))]);
        if let Some(row) = D::fetch_optional(&mut conn, &self.sql.renew, args).await? {
            return Self::lease_from_row(&row, &lease.key, lease.attempt);
        }
        let entry = self
            .get_on(&mut conn, &lease.key)
            .await?
            .ok_or_else(not_found)?;
        check_fence(&entry, lease).map_err(lease_lost)?;
        Err(other(format!("{} renew: the entry kept changing", D::NAME)))
    }

    pub(super) async fn ignore_once(&self, request: &IgnoreRequest) -> Result<IgnoreOutcome, Fail> {
        for _ in 0..3 {
            let mut args = key_args(&request.key);
            args.extend([
                Arg::Str(&request.event_type),
                Arg::Int(request.event_created),
                Arg::Bytes(&request.fingerprint.0[..]),
                Arg::Str(&request.reason),
            ]);
            if self.execute(&self.sql.ignore, args).await? > 0 {
                return Ok(IgnoreOutcome::Recorded);
            }
            if let Some((state, _)) = self.state_of(&request.key).await? {
                return Ok(IgnoreOutcome::Known(state));
            }
        }
        Err(other(format!(
            "{} ignore: the entry kept changing",
            D::NAME
        )))
    }

    pub(super) async fn state_of(
        &self,
        key: &EventKey,
    ) -> Result<Option<(LedgerState, Fingerprint)>, Fail> {
        self.fetch_optional(&self.sql.state_of, key_args(key))
            .await?
            .as_ref()
            .map(Self::state_and_fingerprint)
            .transpose()
    }

    pub(super) async fn list_once(&self, query: &LedgerQuery) -> Result<Vec<LedgerEntry>, Fail> {
        let states: BTreeSet<&str> = query.states.iter().map(|s| s.as_str()).collect();
        if states.len() > STATE_SLOTS {
            return Err(other(format!("{} list: too many states", D::NAME)));
        }
        let mut args = vec![Arg::Int(i64::try_from(states.len()).unwrap_or(i64::MAX))];
        args.extend(states.iter().map(|s| Arg::OptStr(Some(s))));
        args.extend((states.len()..STATE_SLOTS).map(|_| Arg::OptStr(None)));
        args.push(Arg::OptStr(query.after.as_deref()));
        args.push(Arg::Int(limit_of(query.limit)));
        self.fetch_all(&self.sql.list, args)
            .await?
            .iter()
            .map(Self::entry_from_row)
            .collect()
    }

    pub(super) async fn enqueue_once(
        &self,
        request: &InboxRequest,
    ) -> Result<EnqueueOutcome, Fail> {
        let claim = &request.claim;
        for _ in 0..3 {
            if let Some(sql) = &self.sql.enqueue_or_state {
                // One statement: stored, or the existing entry's state
                // (with this payload attached when it had none). The
                // state is read from the statement's snapshot: an entry
                // inserted concurrently and not yet visible is read again.
                let row = self.fetch_optional(sql, enqueue_args(request)).await?;
                let Some(row) = row else { continue };
                if D::int(&row, "queued")? == Some(1) {
                    return Ok(EnqueueOutcome::Queued);
                }
                if D::text(&row, "state")?.is_none() {
                    continue;
                }
                let (state, stored) = Self::state_and_fingerprint(&row)?;
                return Ok(if stored == claim.fingerprint {
                    EnqueueOutcome::Duplicate { state }
                } else {
                    EnqueueOutcome::Conflict
                });
            }
            if self
                .execute(&self.sql.enqueue, enqueue_args(request))
                .await?
                > 0
            {
                return Ok(EnqueueOutcome::Queued);
            }
            // Known already. An unsettled entry without a payload (claimed
            // by a synchronous delivery) gets this one, so a worker can take
            // it over once its lease expires.
            let mut args = key_args(&claim.key);
            args.extend([
                Arg::Bytes(&claim.fingerprint.0[..]),
                Arg::Str(&request.payload),
                Arg::OptStr(request.subscription_id.as_deref()),
            ]);
            self.execute(&self.sql.attach_payload, args).await?;
            if let Some((state, stored)) = self.state_of(&claim.key).await? {
                return Ok(if stored == claim.fingerprint {
                    EnqueueOutcome::Duplicate { state }
                } else {
                    EnqueueOutcome::Conflict
                });
            }
        }
        Err(other(format!(
            "{} enqueue: the entry kept changing",
            D::NAME
        )))
    }

    pub(super) async fn take_once(
        &self,
        limit: usize,
        lease: Duration,
        max_attempts: u32,
    ) -> Result<Vec<InboxItem>, Fail> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut tx = D::begin(&self.pool).await?;
        let row = D::fetch_optional(&mut tx, &self.sql.now, Vec::new()).await?;
        let now = row
            .map(|r| Self::req_time(&r, "now"))
            .transpose()?
            .ok_or_else(|| Self::corrupt("clock"))?;
        let args = vec![Arg::Time(now), Arg::Int(limit_of(limit))];
        let rows = D::fetch_all(&mut tx, &self.sql.take, args).await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let entry = Self::entry_from_row(row)?;
            if let (Some(sub), Some(sql)) =
                (&entry.subscription_id, &self.sql.try_lock_subscription)
            {
                // Whoever holds this lock is leasing an event of the same
                // subscription right now: leave it to them.
                let key = format!("stripe_webhook_guard:{}:{sub}", self.naming);
                let row = D::fetch_optional(&mut tx, sql, vec![Arg::Str(&key)]).await?;
                if row.is_none_or(|r| D::int(&r, "mine").ok().flatten() != Some(1)) {
                    continue;
                }
            }
            let request = ClaimRequest {
                key: entry.key.clone(),
                event_type: entry.event_type.clone(),
                event_created: entry.event_created,
                fingerprint: entry.fingerprint,
                lease,
                max_attempts,
            };
            let sub = entry.subscription_id.as_deref();
            let outcome = self
                .apply_decision(&mut tx, &entry, &request, now, sub)
                .await?;
            if let Some(ClaimOutcome::Claimed(lease)) = outcome {
                out.push(InboxItem {
                    lease,
                    payload: entry.payload.unwrap_or_default(),
                    subscription_id: entry.subscription_id,
                });
            }
        }
        D::commit(tx).await?;
        Ok(out)
    }

    pub(super) async fn save_once(&self, record: &SubscriptionRecord) -> Result<u64, Fail> {
        let next = record
            .version
            .checked_add(1)
            .ok_or_else(|| other(format!("{} save: version out of range", D::NAME)))?;
        let mut saved = record.clone();
        saved.version = next;
        let (sql, current) = if record.version == 0 {
            (&self.sql.sub_insert, None)
        } else {
            let v = Self::to_i64(record.version, "version")?;
            (&self.sql.sub_update, Some(Arg::Int(v)))
        };
        let mut args = vec![
            Arg::Str(&record.id),
            Arg::OptStr(record.state.customer.as_deref()),
            Arg::OptStr(record.client_reference_id.as_deref()),
            Arg::Bool(record.needs_review),
            Arg::Bool(record.needs_reconcile),
            Arg::OptTime(record.last_verified_with_stripe),
            Arg::Int(Self::to_i64(next, "version")?),
            Arg::Json(json_of(&saved, "subscription record")?),
        ];
        args.extend(current);
        if self.execute(sql, args).await? == 0 {
            return Err(Fail::Store(StoreError::new(
                StoreErrorKind::Conflict,
                format!(
                    "subscription {} was saved by another writer (expected version {})",
                    record.id, record.version
                ),
            )));
        }
        Ok(next)
    }

    pub(super) async fn records(
        &self,
        sql: &Arc<str>,
        args: Vec<Arg<'_>>,
    ) -> Result<Vec<SubscriptionRecord>, Fail> {
        self.fetch_all(sql, args)
            .await?
            .iter()
            .map(Self::record_from_row)
            .collect()
    }

    pub(super) async fn save_entitlements_once(
        &self,
        e: &CustomerEntitlements,
    ) -> Result<u64, Fail> {
        let next = e.version.checked_add(1).ok_or_else(|| {
            other(format!(
                "{} save_entitlements: version out of range",
                D::NAME
            ))
        })?;
        let mut saved = e.clone();
        saved.version = next;
        let (sql, current) = if e.version == 0 {
            (&self.sql.ent_insert, None)
        } else {
            let v = Self::to_i64(e.version, "version")?;
            (&self.sql.ent_update, Some(Arg::Int(v)))
        };
        let mut args = vec![
            Arg::Str(&e.customer),
            Arg::Int(Self::to_i64(next, "version")?),
            Arg::Json(json_of(&saved, "entitlements")?),
        ];
        args.extend(current);
        if self.execute(sql, args).await? == 0 {
            return Err(Fail::Store(StoreError::new(
                StoreErrorKind::Conflict,
                "entitlements were saved by another writer",
            )));
        }
        Ok(next)
    }
}

#[async_trait]

impl<D: Dialect> EventLedger for SqlStore<D> {
    async fn claim(&self, request: &ClaimRequest) -> Result<ClaimOutcome, StoreError> {
        run::<D, _, _, _>("claim", || self.claim_once(request)).await
    }

    async fn complete(&self, lease: &Lease) -> Result<(), StoreError> {
        run::<D, _, _, _>("complete", || async {
            let mut conn = D::acquire(&self.pool).await?;
            self.complete_on(&mut conn, lease).await
        })
        .await
    }

    async fn fail(&self, lease: &Lease, failure: &Failure) -> Result<FailOutcome, StoreError> {
        run::<D, _, _, _>("fail", || self.fail_once(lease, failure)).await
    }

    async fn release(&self, lease: &Lease) -> Result<(), StoreError> {
        run::<D, _, _, _>("release", || self.release_once(lease)).await
    }

    async fn ignore(&self, request: &IgnoreRequest) -> Result<IgnoreOutcome, StoreError> {
        run::<D, _, _, _>("ignore", || self.ignore_once(request)).await
    }

    async fn get(&self, key: &EventKey) -> Result<Option<LedgerEntry>, StoreError> {
        run::<D, _, _, _>("get", || async {
            let mut conn = D::acquire(&self.pool).await?;
            self.get_on(&mut conn, key).await
        })
        .await
    }

    async fn list(&self, query: &LedgerQuery) -> Result<Vec<LedgerEntry>, StoreError> {
        run::<D, _, _, _>("list", || self.list_once(query)).await
    }

    async fn requeue(&self, key: &EventKey) -> Result<bool, StoreError> {
        run::<D, _, _, _>("requeue", || async {
            Ok(self.execute(&self.sql.requeue, key_args(key)).await? > 0)
        })
        .await
    }

    async fn prune(&self, before: OffsetDateTime) -> Result<u64, StoreError> {
        run::<D, _, _, _>("prune", || {
            self.execute(&self.sql.prune, vec![Arg::Time(before)])
        })
        .await
    }
}

#[async_trait]
impl<D: Dialect> SubscriptionStore for SqlStore<D> {
    async fn load(&self, id: &str) -> Result<Option<SubscriptionRecord>, StoreError> {
        run::<D, _, _, _>("load", || async {
            self.fetch_optional(&self.sql.sub_load, vec![Arg::Str(id)])
                .await?
                .as_ref()
                .map(Self::record_from_row)
                .transpose()
        })
        .await
    }

    async fn save(&self, record: &SubscriptionRecord) -> Result<u64, StoreError> {
        run::<D, _, _, _>("save", || self.save_once(record)).await
    }

    async fn find_by_customer(
        &self,
        customer: &str,
    ) -> Result<Vec<SubscriptionRecord>, StoreError> {
        run::<D, _, _, _>("find_by_customer", || {
            self.records(&self.sql.sub_by_customer, vec![Arg::Str(customer)])
        })
        .await
    }

    async fn find_by_client_reference(
        &self,
        reference: &str,
    ) -> Result<Vec<SubscriptionRecord>, StoreError> {
        run::<D, _, _, _>("find_by_client_reference", || {
            self.records(&self.sql.sub_by_reference, vec![Arg::Str(reference)])
        })
        .await
    }

    async fn list_subscriptions(
        &self,
        query: &SubscriptionQuery,
    ) -> Result<Vec<SubscriptionRecord>, StoreError> {
        run::<D, _, _, _>("list_subscriptions", || {
            let args = vec![
                Arg::OptTime(query.verified_before),
                Arg::Bool(query.needs_review),
                Arg::Bool(query.needs_reconcile),
                Arg::OptStr(query.after.as_deref()),
                Arg::Int(limit_of(query.limit)),
            ];
            self.records(&self.sql.sub_list, args)
        })
        .await
    }

    async fn load_entitlements(
        &self,
        customer: &str,
    ) -> Result<Option<CustomerEntitlements>, StoreError> {
        run::<D, _, _, _>("load_entitlements", || async {
            self.fetch_optional(&self.sql.ent_load, vec![Arg::Str(customer)])
                .await?
                .as_ref()
                .map(Self::entitlements_from_row)
                .transpose()
        })
        .await
    }

    async fn save_entitlements(
        &self,
        entitlements: &CustomerEntitlements,
    ) -> Result<u64, StoreError> {
        run::<D, _, _, _>("save_entitlements", || {
            self.save_entitlements_once(entitlements)
        })
        .await
    }
}

#[async_trait]
impl<D: Dialect> CursorStore for SqlStore<D> {
    async fn load_cursor(&self, name: &str) -> Result<Option<String>, StoreError> {
        run::<D, _, _, _>("load_cursor", || async {
            let row = self
                .fetch_optional(&self.sql.cursor_load, vec![Arg::Str(name)])
                .await?;
            Ok(row.map(|r| D::text(&r, "value")).transpose()?.flatten())
        })
        .await
    }

    async fn save_cursor(&self, name: &str, value: &str) -> Result<(), StoreError> {
        run::<D, _, _, _>("save_cursor", || async {
            let args = vec![Arg::Str(name), Arg::Str(value)];
            self.execute(&self.sql.cursor_save, args).await?;
            Ok(())
        })
        .await
    }
}

#[async_trait]
impl<D: Dialect> InboxStore for SqlStore<D> {
    async fn enqueue(&self, request: &InboxRequest) -> Result<EnqueueOutcome, StoreError> {
        run::<D, _, _, _>("enqueue", || self.enqueue_once(request)).await
    }

    async fn take(
        &self,
        limit: usize,
        lease: Duration,
        max_attempts: u32,
    ) -> Result<Vec<InboxItem>, StoreError> {
        run::<D, _, _, _>("take", || self.take_once(limit, lease, max_attempts)).await
    }

    async fn renew(&self, lease: &Lease, lease_for: Duration) -> Result<Lease, StoreError> {
        run::<D, _, _, _>("renew", || self.renew_once(lease, lease_for)).await
    }

    async fn retry_after(&self, key: &EventKey, delay: Duration) -> Result<(), StoreError> {
        run::<D, _, _, _>("retry_after", || async {
            let mut args = key_args(key);
            args.push(Arg::Int(lease_micros(delay)));
            self.execute(&self.sql.retry_after, args).await?;
            Ok(())
        })
        .await
    }

    async fn keep_payload(&self, key: &EventKey, payload: &str) -> Result<(), StoreError> {
        run::<D, _, _, _>("keep_payload", || async {
            let mut args = key_args(key);
            args.push(Arg::Str(payload));
            self.execute(&self.sql.keep_payload, args).await?;
            Ok(())
        })
        .await
    }

    async fn backlog(&self) -> Result<u64, StoreError> {
        run::<D, _, _, _>("backlog", || async {
            let row = self.fetch_optional(&self.sql.backlog, Vec::new()).await?;
            let n = row.map(|r| D::int(&r, "n")).transpose()?.flatten();
            Ok(n.and_then(|n| u64::try_from(n).ok()).unwrap_or(0))
        })
        .await
    }
}

/// The arguments of the `enqueue` statements: the key, type, creation time,
/// fingerprint, payload and subscription id.
fn enqueue_args(request: &InboxRequest) -> Vec<Arg<'_>> {
    let claim = &request.claim;
    let mut args = key_args(&claim.key);
    args.extend([
        Arg::Str(&claim.event_type),
        Arg::Int(claim.event_created),
        Arg::Bytes(&claim.fingerprint.0[..]),
        Arg::Str(&request.payload),
        Arg::OptStr(request.subscription_id.as_deref()),
    ]);
    args
}
