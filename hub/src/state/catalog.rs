//! The catalog: product writes, and how a write based on a stale version is settled by the
//! branch's conflict policy (`server_wins`, `client_wins`, `newest_wins`, field-level `merge`,
//! or `manual`, held for an admin to resolve).

use branchline_protocol::{
    ConflictDetail, ConflictNote, ConflictOutcome, ConflictPolicy, ConflictRecord,
    ConflictResolved, ConflictStatus, Effect, ErrorCode, EventBody, Name, ProductField,
    ProductFields, ProductRecord, Resolution, Sku, Unit, UnixMillis,
};
use uuid::Uuid;

use super::{
    Applied, BranchState, Change, NEWEST_WINS_TOLERANCE_MS, Policies, ProductState, Refused,
    WriteCtx, field_index,
};

impl BranchState {
    pub(super) fn catalog_write(
        &mut self,
        body: &EventBody,
        ctx: &WriteCtx<'_>,
        policies: Policies,
    ) -> Result<Applied, Refused> {
        let (sku, write) = match body {
            EventBody::ProductUpserted(u) => (&u.sku, Write::Fields(&u.fields)),
            EventBody::ProductRemoved(r) => (&r.sku, Write::Remove),
            _ => return Err(Refused::new(ErrorCode::Internal, "not a catalog write")),
        };
        let current = self.products.get(sku).cloned();
        let version = current.as_ref().map_or(0, |p| p.record.version);
        if ctx.base_version == version {
            return self.write_product(sku, current.as_ref(), write, ctx.device, ctx.write_time_ms);
        }
        let conflict = Stale {
            sku,
            body,
            current: current.as_ref(),
            ctx,
        };
        let policy = match write {
            Write::Fields(_) => policies.upserted,
            Write::Remove => policies.removed,
        };
        match (policy, write) {
            (ConflictPolicy::Merge, Write::Fields(fields)) => {
                self.merge(&conflict, fields, policies.merge_fallback)
            }
            (ConflictPolicy::Merge, Write::Remove) => {
                self.settle(&conflict, write, policies.merge_fallback, Vec::new())
            }
            (policy, write) => self.settle(&conflict, write, policy, Vec::new()),
        }
    }

    /// Settles a stale write with a whole-write policy.
    fn settle(
        &mut self,
        stale: &Stale<'_>,
        write: Write<'_>,
        policy: ConflictPolicy,
        contested: Vec<ProductField>,
    ) -> Result<Applied, Refused> {
        let client_wins = match policy {
            ConflictPolicy::ClientWins => true,
            ConflictPolicy::NewestWins => stale.client_is_newer(),
            ConflictPolicy::Manual => {
                let mut applied = Applied::default();
                self.hold(&mut applied, stale, policy, contested);
                return Ok(applied);
            }
            ConflictPolicy::ServerWins | ConflictPolicy::Merge => false,
        };
        if !client_wins {
            return Err(stale.refuse(policy, contested));
        }
        let mut applied = self.write_product(
            stale.sku,
            stale.current,
            write,
            stale.ctx.device,
            stale.ctx.write_time_ms,
        )?;
        stale.record(&mut applied, policy, ConflictOutcome::ClientWon, contested);
        Ok(applied)
    }

    /// `merge`: the fields the write sets that the server did not change since the write's base
    /// are applied; fields both changed are settled by `fallback`.
    fn merge(
        &mut self,
        stale: &Stale<'_>,
        fields: &ProductFields,
        fallback: ConflictPolicy,
    ) -> Result<Applied, Refused> {
        let base = stale.ctx.base_version;
        let contested: Vec<ProductField> = fields
            .present()
            .into_iter()
            .filter(|f| stale.current.is_some_and(|p| p.field_version(*f) > base))
            .collect();
        // The fallback settles the contested fields only, whichever it is: under `manual` the
        // uncontested ones are applied now like under any other fallback, and the admin is
        // asked about exactly the fields in dispute.
        let (keep_client, held) = match fallback {
            _ if contested.is_empty() => (true, false),
            ConflictPolicy::ClientWins => (true, false),
            ConflictPolicy::NewestWins => (stale.client_is_newer(), false),
            ConflictPolicy::Manual => (false, true),
            ConflictPolicy::ServerWins | ConflictPolicy::Merge => (false, false),
        };
        let mut merged = fields.clone();
        if !keep_client {
            for f in &contested {
                merged.clear(*f);
            }
        }
        if merged.is_empty() && !held {
            return Err(stale.refuse(ConflictPolicy::Merge, contested));
        }
        let mut applied = if merged.is_empty() {
            Applied::default()
        } else {
            self.write_product(
                stale.sku,
                stale.current,
                Write::Fields(&merged),
                stale.ctx.device,
                stale.ctx.write_time_ms,
            )?
        };
        if held {
            self.hold(&mut applied, stale, ConflictPolicy::Merge, contested);
        } else {
            stale.record(
                &mut applied,
                ConflictPolicy::Merge,
                ConflictOutcome::Merged,
                contested,
            );
        }
        Ok(applied)
    }

    /// `manual`: accept the event and hold the conflict for an admin; the product keeps what
    /// `applied` already did to it (nothing, unless `merge` applied uncontested fields).
    fn hold(
        &mut self,
        applied: &mut Applied,
        stale: &Stale<'_>,
        policy: ConflictPolicy,
        contested: Vec<ProductField>,
    ) {
        let record = stale.record(applied, policy, ConflictOutcome::Held, contested);
        self.open_conflicts.insert(record.id, record);
    }

    /// Applies a write to the product as it is now (no version check).
    fn write_product(
        &mut self,
        sku: &Sku,
        current: Option<&ProductState>,
        write: Write<'_>,
        by: &Name,
        at_ms: UnixMillis,
    ) -> Result<Applied, Refused> {
        let version = current.map_or(0, |p| p.record.version) + 1;
        let exists = current.is_some_and(|p| !p.record.removed);
        let next = match (write, current) {
            (Write::Remove, _) if !exists => return Ok(Applied::default()),
            (Write::Remove, Some(p)) => {
                let mut record = p.record.clone();
                record.removed = true;
                ProductState {
                    record,
                    field_versions: [version; 6],
                }
            }
            (Write::Fields(fields), Some(p)) if exists => {
                let mut next = p.clone();
                next.record.apply_fields(fields);
                for f in fields.present() {
                    next.field_versions[field_index(f)] = version;
                }
                next
            }
            (Write::Fields(fields), _) => {
                let (Some(name), Some(price)) = (&fields.name, fields.price) else {
                    return Err(Refused::new(
                        ErrorCode::InvalidEvent,
                        format!("creating product {sku} needs a name and a price"),
                    ));
                };
                let mut record = ProductRecord {
                    sku: sku.clone(),
                    version,
                    removed: false,
                    name: name.clone(),
                    price,
                    barcode: None,
                    category: None,
                    tax_code: None,
                    unit: Unit::Piece,
                    updated_at_ms: at_ms,
                    updated_by: by.clone(),
                };
                record.apply_fields(fields);
                ProductState {
                    record,
                    field_versions: [version; 6],
                }
            }
            (Write::Remove, None) => return Ok(Applied::default()),
        };
        let mut next = next;
        next.record.version = version;
        next.record.updated_at_ms = at_ms;
        next.record.updated_by = by.clone();
        self.products.insert(sku.clone(), next.clone());
        Ok(Applied {
            effect: Effect {
                product: Some(next.record.clone()),
                ..Effect::default()
            },
            changes: vec![Change::Product(sku.clone(), Box::new(next))],
        })
    }

    /// Resolves an open conflict. Returns what to persist with the `conflict.resolved` event
    /// and its body.
    pub fn resolve(
        &mut self,
        id: &Uuid,
        resolution: Resolution,
        fields: Option<&ProductFields>,
        admin: &Name,
        now_ms: UnixMillis,
        seq: u64,
    ) -> Result<(Applied, ConflictResolved), Refused> {
        let record =
            self.open_conflicts.get(id).cloned().ok_or_else(|| {
                Refused::new(ErrorCode::NotFound, format!("no open conflict {id}"))
            })?;
        let current = self.products.get(&record.sku).cloned();
        let held;
        let mut applied = match resolution {
            Resolution::Server => Applied::default(),
            Resolution::Local => {
                let write = match &record.client {
                    EventBody::ProductUpserted(u) if record.policy == ConflictPolicy::Merge => {
                        // `merge` applied the uncontested fields when it held the write; only
                        // the contested ones are still waiting.
                        let mut fields = u.fields.clone();
                        for f in fields.present() {
                            if !record.contested.contains(&f) {
                                fields.clear(f);
                            }
                        }
                        held = fields;
                        Write::Fields(&held)
                    }
                    EventBody::ProductUpserted(u) => Write::Fields(&u.fields),
                    EventBody::ProductRemoved(_) => Write::Remove,
                    _ => {
                        return Err(Refused::new(
                            ErrorCode::Internal,
                            "held write is not a catalog write",
                        ));
                    }
                };
                self.write_product(&record.sku, current.as_ref(), write, admin, now_ms)?
            }
            Resolution::Merged => {
                let fields = fields.filter(|f| !f.is_empty()).ok_or_else(|| {
                    Refused::new(
                        ErrorCode::InvalidEvent,
                        "a merged resolution needs the fields to apply",
                    )
                })?;
                fields
                    .validate()
                    .map_err(|e| Refused::new(ErrorCode::InvalidEvent, e.0))?;
                self.write_product(
                    &record.sku,
                    current.as_ref(),
                    Write::Fields(fields),
                    admin,
                    now_ms,
                )?
            }
        };
        self.open_conflicts.remove(id);
        let resolved = ConflictRecord {
            status: ConflictStatus::Resolved,
            outcome: ConflictOutcome::Resolved,
            resolution: Some(resolution),
            resolved_by: Some(admin.clone()),
            resolved_at_ms: Some(now_ms),
            resolution_seq: Some(seq),
            ..record
        };
        applied.effect.conflict = Some(ConflictNote {
            id: *id,
            policy: resolved.policy,
            outcome: ConflictOutcome::Resolved,
            contested: resolved.contested.clone(),
        });
        let body = ConflictResolved {
            conflict_id: *id,
            sku: resolved.sku.clone(),
            resolution,
            resolved_by: admin.clone(),
            product: self.products.get(&resolved.sku).map(|p| p.record.clone()),
        };
        applied.changes.push(Change::Conflict(Box::new(resolved)));
        Ok((applied, body))
    }
}

#[derive(Clone, Copy)]
enum Write<'a> {
    Fields(&'a ProductFields),
    Remove,
}

/// A catalog write whose base is not the current version.
struct Stale<'a> {
    sku: &'a Sku,
    body: &'a EventBody,
    current: Option<&'a ProductState>,
    ctx: &'a WriteCtx<'a>,
}

impl Stale<'_> {
    fn client_is_newer(&self) -> bool {
        self.current.is_none_or(|p| {
            self.ctx.write_time_ms
                > p.record
                    .updated_at_ms
                    .saturating_add(NEWEST_WINS_TOLERANCE_MS)
        })
    }

    fn conflict_record(
        &self,
        policy: ConflictPolicy,
        outcome: ConflictOutcome,
        contested: Vec<ProductField>,
        seq: Option<u64>,
    ) -> ConflictRecord {
        let held = outcome == ConflictOutcome::Held;
        ConflictRecord {
            id: Uuid::now_v7(),
            branch: self.ctx.branch.clone(),
            sku: self.sku.clone(),
            kind: self.body.kind(),
            status: if held {
                ConflictStatus::Open
            } else {
                ConflictStatus::Resolved
            },
            policy,
            outcome,
            device: self.ctx.device.clone(),
            event_id: self.ctx.event_id,
            seq,
            detected_at_ms: self.ctx.now_ms,
            base_version: self.ctx.base_version,
            server: self.current.map(|p| p.record.clone()),
            client: self.body.clone(),
            contested,
            resolution: None,
            resolved_by: None,
            resolved_at_ms: None,
            resolution_seq: None,
        }
    }

    /// Adds the conflict to an accepted event's effect and changes; returns the record.
    fn record(
        &self,
        applied: &mut Applied,
        policy: ConflictPolicy,
        outcome: ConflictOutcome,
        contested: Vec<ProductField>,
    ) -> ConflictRecord {
        let record = self.conflict_record(policy, outcome, contested, Some(self.ctx.seq));
        applied.effect.conflict = Some(ConflictNote {
            id: record.id,
            policy,
            outcome,
            contested: record.contested.clone(),
        });
        applied
            .changes
            .push(Change::Conflict(Box::new(record.clone())));
        record
    }

    fn refuse(&self, policy: ConflictPolicy, contested: Vec<ProductField>) -> Refused {
        let record = self.conflict_record(policy, ConflictOutcome::ServerWon, contested, None);
        let server_version = self.current.map_or(0, |p| p.record.version);
        Refused {
            code: ErrorCode::Conflict,
            message: format!(
                "{} of {} is based on version {} but the hub has version {server_version}",
                self.body.kind(),
                self.sku,
                self.ctx.base_version
            ),
            conflict: Some(Box::new(ConflictDetail {
                conflict_id: record.id,
                sku: self.sku.clone(),
                base_version: self.ctx.base_version,
                server_version,
                server: record.server.clone(),
            })),
            record: Some(Box::new(record)),
        }
    }
}
