## Reference fits of real mixed-model data sets with glmmTMB (Laplace, ML) and lme4.
##
##   DATA=examples/data Rscript reference/r/glmmtmb_mixed.R
##   DATA=examples/data SETS=verbagg,insteval Rscript reference/r/glmmtmb_mixed.R
##
## Reads the CSVs written by reference/r/export_data.R (plus cbpp.csv) from $DATA (default examples/data)
## and the factor level order from $DATA/factor_levels.json; writes $OUTJSON (default
## reference/mixed_models.json) and prints a human-readable table. With $SETS (comma-separated names of
## `specs` below) only those models are fitted and their entries are replaced in (or added to) the existing
## $OUTJSON, every other entry is kept byte for byte, and the run is recorded under provenance$updates. The
## whole run takes about 6 minutes, 5 of them verbagg and insteval.
##
## Factor columns are rebuilt with the level order R uses (factor_levels.json; Salamanders$site is an ordered
## factor as in glmmTMB). Every model is also fitted by glmmTMB to the original data set from the R package and
## the two logLiks are compared: they are identical (difference exactly 0, checked below and stored as
## "csv_vs_package_logLik_diff"), so the CSVs are a faithful copy for these models.
##
## Deps (Debian): apt-get install r-base-core r-cran-lme4 r-cran-glmmtmb r-cran-tmb r-cran-jsonlite
suppressPackageStartupMessages({
  library(lme4); library(glmmTMB); library(TMB); library(Matrix); library(jsonlite)
})

data_dir <- Sys.getenv("DATA", "examples/data")
out_json <- Sys.getenv("OUTJSON", "reference/mixed_models.json")
lev <- fromJSON(file.path(data_dir, "factor_levels.json"), simplifyVector = TRUE)

read_set <- function(name, file) {
  d <- read.csv(file.path(data_dir, file), stringsAsFactors = FALSE)
  for (col in names(lev$levels[[name]])) {
    ordered <- !is.null(lev$ordered[[name]]) && col %in% lev$ordered[[name]]
    d[[col]] <- factor(as.character(d[[col]]), levels = lev$levels[[name]][[col]], ordered = ordered)
    stopifnot(!anyNA(d[[col]]))
  }
  d
}

csv <- list(
  sleepstudy = read_set("sleepstudy", "sleepstudy.csv"),
  penicillin = read_set("penicillin", "penicillin.csv"),
  grouseticks = read_set("grouseticks", "grouseticks.csv"),
  salamanders = read_set("salamanders", "salamanders.csv"),
  cbpp = read_set("cbpp", "cbpp.csv"),
  verbagg = read_set("verbagg", "verbagg.csv"),
  insteval = read_set("insteval", "insteval.csv"))
pkg <- list(sleepstudy = lme4::sleepstudy, penicillin = lme4::Penicillin, grouseticks = lme4::grouseticks,
            salamanders = glmmTMB::Salamanders, cbpp = lme4::cbpp, verbagg = lme4::VerbAgg,
            insteval = lme4::InstEval)
## HEIGHT_scaled in the CSV is exactly what scale(HEIGHT) computes inside the formula
stopifnot(identical(csv$grouseticks$HEIGHT_scaled, as.numeric(scale(csv$grouseticks$HEIGHT))))

specs <- list(
  sleepstudy = list(data = "sleepstudy", formula = Reaction ~ Days + (Days | Subject),
                    family = "gaussian", lme4 = "lmer"),
  penicillin = list(data = "penicillin", formula = diameter ~ 1 + (1 | plate) + (1 | sample),
                    family = "gaussian", lme4 = "lmer"),
  grouseticks = list(data = "grouseticks",
                     formula = TICKS ~ YEAR + scale(HEIGHT) + (1 | BROOD) + (1 | INDEX) + (1 | LOCATION),
                     family = "poisson", lme4 = "glmer"),
  salamanders = list(data = "salamanders", formula = count ~ spp + mined + (1 | site),
                     family = "nbinom2", lme4 = "glmer.nb"),
  ## zi = ~ spp is on the boundary: the fitted zero-inflation probability of spp GP and DM goes to 0
  ## (betazi for them runs off to about -18 and -22 on the logit scale), the Hessian is not positive definite
  ## and glmmTMB's logLik() returns NA; the maximised log likelihood is -fit$fit$objective.
  salamanders_zi = list(data = "salamanders", formula = count ~ spp + mined + (1 | site), zi = ~ spp,
                        family = "nbinom2", lme4 = NA),
  ## a zero-inflated fit with an interior optimum (positive definite Hessian), as a well-posed ZI reference
  salamanders_zi_mined = list(data = "salamanders", formula = count ~ spp + mined + (1 | site), zi = ~ mined,
                              family = "nbinom2", lme4 = NA),
  cbpp = list(data = "cbpp", formula = cbind(incidence, size - incidence) ~ period + (1 | herd),
              family = "binomial", lme4 = "glmer"),
  ## the larger data sets: lme4's VerbAgg example (binary r2, crossed person x item intercepts) and InstEval
  ## (students crossed with lecturers, 4114 random effects)
  verbagg = list(data = "verbagg", formula = r2 ~ Anger + Gender + btype + situ + (1 | id) + (1 | item),
                 family = "binomial", lme4 = "glmer"),
  insteval = list(data = "insteval", formula = y ~ service + (1 | s) + (1 | d) + (1 | dept),
                  family = "gaussian", lme4 = "lmer"))

partial <- nzchar(Sys.getenv("SETS", ""))
if (partial) {
  sets <- strsplit(Sys.getenv("SETS"), ",", fixed = TRUE)[[1]]
  if (!all(sets %in% names(specs))) stop("unknown SETS: ", paste(setdiff(sets, names(specs)), collapse = ", "))
  specs <- specs[sets]
}

## plug-in conditional SDs need a dense inverse of H_uu: skipped above this many random effects (InstEval's
## 4114 take minutes with the reference BLAS); lme4's condsd is the same plug-in quantity for Gaussian models
max_dense_plugin <- 2000

fam <- function(name) switch(name, gaussian = gaussian(), poisson = poisson(), binomial = binomial(),
                             nbinom2 = nbinom2())

## run expr, collect warnings instead of printing them
catch_warn <- function(expr) {
  w <- character(0)
  val <- withCallingHandlers(expr, warning = function(c) {
    w <<- c(w, conditionMessage(c)); invokeRestart("muffleWarning")
  })
  list(value = val, warnings = unique(w))
}

fit_tmb <- function(s, d) {
  glmmTMB(s$formula, data = d, family = fam(s$family),
          ziformula = if (is.null(s$zi)) ~0 else s$zi, REML = FALSE)
}
fit_lme4 <- function(s, d) {
  switch(s$lme4,
         lmer = lmer(s$formula, data = d, REML = FALSE),
         glmer = glmer(s$formula, data = d, family = fam(s$family)),
         glmer.nb = glmer.nb(s$formula, data = d))
}

timed <- function(f) {
  t1 <- system.time(r1 <- catch_warn(f()))[["elapsed"]]
  t2 <- system.time(r2 <- catch_warn(f()))[["elapsed"]]
  list(fit = r2$value, warnings = unique(c(r1$warnings, r2$warnings)),
       time = list(first_call_s = round(t1, 3), second_call_s = round(t2, 3)))
}

coef_table <- function(m) {
  ## m: matrix with Estimate, Std. Error columns (rownames = names as R prints them)
  setNames(lapply(seq_len(nrow(m)), function(i)
    list(estimate = unname(m[i, 1]), se = unname(m[i, 2]))), rownames(m))
}

varcorr_list <- function(vc) {
  ## vc: list of covariance matrices per grouping factor (lme4 or glmmTMB VarCorr component)
  lapply(vc, function(v) {
    sds <- attr(v, "stddev")
    r <- list(sd = as.list(sds))
    cr <- attr(v, "correlation")
    if (length(sds) > 1) {
      r$correlation <- list()
      for (i in 1:(length(sds) - 1)) for (j in (i + 1):length(sds))
        r$correlation[[paste(names(sds)[i], names(sds)[j], sep = ",")]] <- cr[i, j]
    }
    r
  })
}

## labels for glmmTMB's internal parameter vector fit$fit$par
par_labels <- function(fit) {
  p <- fit$fit$par
  nm <- names(p)
  lab <- character(length(p))
  fe <- fixef(fit)
  lab[nm == "beta"] <- paste0("cond:", names(fe$cond))
  lab[nm == "betazi"] <- paste0("zi:", names(fe$zi))
  fam <- family(fit)$family
  lab[nm == "betad"] <- switch(fam, gaussian = "log(sigma^2)  [glmmTMB 1.1.5: betad = 2*log(sigma(fit))]",
                               nbinom2 = "log(theta)  [theta = sigma(fit), Var = mu + mu^2/theta]",
                               paste("betad", fam))
  th <- character(0)
  rs <- fit$modelInfo$reStruc$condReStruc
  cn <- fit$modelInfo$reTrms$cond$cnms
  for (k in seq_along(rs)) {
    g <- names(cn)[k]; cols <- cn[[k]]; n <- rs[[k]]$blockSize
    stopifnot(names(rs[[k]]$blockCode) == "us")
    th <- c(th, paste0("log_sd(", g, ":", cols, ")"))
    if (n > 1) for (j in 2:n) for (i in 1:(j - 1))
      th <- c(th, paste0("corr_par(", g, ":", cols[i], ",", cols[j], ")"))
  }
  lab[nm == "theta"] <- th
  lab
}

tmb_summary <- function(fit) {
  s <- summary(fit)
  fe <- list(cond = coef_table(s$coefficients$cond[, 1:2, drop = FALSE]))
  if (!is.null(s$coefficients$zi)) fe$zi <- coef_table(s$coefficients$zi[, 1:2, drop = FALSE])
  sf <- summary(fit$sdr, "fixed")
  stopifnot(all(abs(sf[, 1] - fit$fit$par) == 0), identical(rownames(sf), names(fit$fit$par)))
  ## conditional modes: ranef() gives condsd from sdreport's diag.cov.random, which (TMB) includes the
  ## uncertainty of the estimated fixed parameters. Also give the plug-in conditional SD,
  ## sqrt(diag(H_uu^{-1})) with H_uu the Hessian of the joint negative log density in the random effects
  ## at the estimate (what lme4's condVar and a plain Laplace step give).
  env <- fit$obj$env
  H <- env$spHess(env$last.par.best, random = TRUE)
  plugin_sd <- if (nrow(H) <= max_dense_plugin) sqrt(diag(solve(as.matrix(H)))) else rep(NA_real_, nrow(H))
  re <- as.data.frame(ranef(fit, condVar = TRUE))
  re <- re[re$component == "cond", ]
  ## order of b in the TMB vector: term by term, within a term level-major (all columns of level 1, ...)
  b_order <- unlist(lapply(seq_along(fit$modelInfo$reTrms$cond$cnms), function(k) {
    g <- names(fit$modelInfo$reTrms$cond$cnms)[k]
    cols <- fit$modelInfo$reTrms$cond$cnms[[k]]
    levs <- levels(fit$frame[[g]])
    as.vector(t(outer(levs, cols, function(l, cc) paste(g, cc, l, sep = "|"))))
  }))
  key <- paste(re$grpvar, re$term, re$grp, sep = "|")
  stopifnot(setequal(key, b_order), length(plugin_sd) == length(b_order))
  plug <- setNames(plugin_sd, b_order)[key]
  ## sanity: the TMB b vector at the optimum equals ranef's modes
  bhat <- setNames(env$last.par.best[env$random], b_order)[key]
  stopifnot(max(abs(bhat - re$condval)) < 1e-8)
  ranef_out <- list()
  for (g in unique(re$grpvar)) {
    ranef_out[[g]] <- list()
    for (tm in unique(re$term[re$grpvar == g])) {
      i <- which(re$grpvar == g & re$term == tm)
      ranef_out[[g]][[tm]] <- list(level = as.character(re$grp[i]), mode = re$condval[i],
                                   condsd_sdreport = re$condsd[i], condsd_plugin = unname(plug[i]))
    }
  }
  res <- list(
    fixed = fe,
    varcorr = varcorr_list(VarCorr(fit)$cond),
    internal_par = list(name = names(fit$fit$par), label = par_labels(fit),
                        estimate = unname(fit$fit$par), se = unname(sf[, 2]),
                        se_source = "summary(fit$sdr, \"fixed\")[, \"Std. Error\"] (= sqrt(diag(vcov(fit, full = TRUE))))"),
    logLik = -fit$fit$objective,
    logLik_meaning = paste("-fit$fit$objective (the maximised Laplace log likelihood); logLik(fit) is the same",
                           "number when the Hessian is positive definite and NA otherwise"),
    logLik_R = as.numeric(logLik(fit)),
    df = attr(logLik(fit), "df"), nobs = nobs(fit),
    AIC = 2 * fit$fit$objective + 2 * attr(logLik(fit), "df"),
    convergence = list(code = fit$fit$convergence, message = fit$fit$message,
                       iterations = fit$fit$iterations,
                       max_abs_gradient = max(abs(fit$sdr$gradient.fixed)), pdHess = fit$sdr$pdHess),
    ranef = ranef_out)
  fm <- family(fit)$family
  if (fm == "gaussian") {
    res$sigma <- sigma(fit)
    res$sigma_meaning <- "residual SD; internal betad = log(sigma^2)"
    stopifnot(abs(exp(fit$fit$par[["betad"]] / 2) - sigma(fit)) < 1e-10 * sigma(fit))
  }
  if (fm == "nbinom2") {
    res$nbinom2_theta <- sigma(fit)
    res$nbinom2_theta_meaning <- "sigma(fit) = theta = NB size; Var(y) = mu + mu^2/theta; internal betad = log(theta)"
    stopifnot(abs(exp(fit$fit$par[["betad"]]) - sigma(fit)) < 1e-10 * sigma(fit))
  }
  if (!is.null(fe$zi)) {
    ## fitted zero-inflation probability for each distinct row of the zi design (logit link)
    zvars <- all.vars(fit$modelInfo$allForm$ziformula)
    u <- unique(fit$frame[, zvars, drop = FALSE])
    X <- model.matrix(fit$modelInfo$allForm$ziformula, u)
    eta <- drop(X %*% fixef(fit)$zi)
    res$zi_prob <- list(by = zvars, level = lapply(zvars, function(v) as.character(u[[v]])),
                        eta = unname(eta), p = unname(plogis(eta)))
  }
  res
}

lme4_summary <- function(fit) {
  cf <- coef(summary(fit))
  r <- list(fixed = coef_table(cf[, 1:2, drop = FALSE]),
            varcorr = varcorr_list(VarCorr(fit)),
            theta = as.list(getME(fit, "theta")),
            logLik = as.numeric(logLik(fit)), df = attr(logLik(fit), "df"), nobs = nobs(fit),
            AIC = AIC(fit))
  if (isLMM(fit)) r$sigma <- sigma(fit)
  nbth <- tryCatch(getME(fit, "glmer.nb.theta"), error = function(e) NA)
  if (length(nbth) == 1 && !is.na(nbth)) {
    r$nbinom2_theta <- getME(fit, "glmer.nb.theta")
    r$nbinom2_theta_meaning <- "glmer.nb theta (NB size); Var(y) = mu + mu^2/theta"
  }
  re <- as.data.frame(ranef(fit, condVar = TRUE))
  r$ranef <- list()
  for (g in unique(re$grpvar)) {
    r$ranef[[g]] <- list()
    for (tm in unique(re$term[re$grpvar == g])) {
      i <- which(re$grpvar == g & re$term == tm)
      r$ranef[[g]][[tm]] <- list(level = as.character(re$grp[i]), mode = re$condval[i],
                                 condsd = re$condsd[i])
    }
  }
  r$convergence_messages <- as.list(fit@optinfo$conv$lme4$messages)
  r
}

results <- list()
for (nm in names(specs)) {
  s <- specs[[nm]]
  d <- csv[[s$data]]
  cat(sprintf("fitting %s ...\n", nm))
  tt <- timed(function() fit_tmb(s, d))
  r <- list(formula = paste(deparse(s$formula, width.cutoff = 500L), collapse = ""),
            ziformula = if (is.null(s$zi)) NULL else paste(deparse(s$zi, width.cutoff = 500L), collapse = ""),
            family = s$family, data = paste0(s$data, ".csv"), method = "Laplace, ML (REML = FALSE)")
  sm <- catch_warn(tmb_summary(tt$fit))
  r$glmmTMB <- c(sm$value, list(time = tt$time, warnings = unique(c(tt$warnings, sm$warnings))))
  ## same model on the package's own data set
  orig <- catch_warn(fit_tmb(s, pkg[[s$data]]))$value
  r$csv_vs_package_logLik_diff <- orig$fit$objective - tt$fit$fit$objective
  if (r$csv_vs_package_logLik_diff != 0) stop(nm, ": CSV refit differs from package-data fit")
  if (!is.na(s$lme4)) {
    tl <- timed(function() fit_lme4(s, d))
    r$lme4 <- c(list(call = s$lme4), lme4_summary(tl$fit), list(time = tl$time, warnings = tl$warnings))
    r$lme4_fit <- tl$fit
    if (s$lme4 == "lmer") r$lme4$call <- "lmer(REML = FALSE)"
    if (s$lme4 == "glmer") r$lme4$call <- "glmer (Laplace, nAGQ = 1)"
  }
  r$tmb_fit <- tt$fit
  results[[nm]] <- r
}

## ---- glmmTMB's correlation parameter for the 2x2 (Days | Subject) term ----
if (!is.null(results$sleepstudy)) {
ss <- results$sleepstudy$tmb_fit
th <- ss$fit$par[names(ss$fit$par) == "theta"]
vc <- VarCorr(ss)$cond$Subject
corr_from_par <- th[[3]] / sqrt(1 + th[[3]]^2)
corr_check <- list(
  theta = unname(th),
  sd_from_exp_theta = exp(unname(th[1:2])),
  sd_VarCorr = unname(attr(vc, "stddev")),
  corr_from_theta3 = corr_from_par,
  corr_VarCorr = attr(vc, "correlation")[1, 2],
  abs_diff = abs(corr_from_par - attr(vc, "correlation")[1, 2]),
  mapping = paste("theta = (log sd_1, log sd_2, t); rho = t / sqrt(1 + t^2) (equivalently t = rho/sqrt(1-rho^2)).",
                  "In general (n x n 'us' term: n log SDs, then n(n-1)/2 parameters t) glmmTMB builds a",
                  "unit-diagonal lower-triangular L whose strict lower triangle is filled row by row",
                  "(L[2,1], L[3,1], L[3,2], L[4,1], ...; TMB's UNSTRUCTURED_CORR, glmmTMB:::get_cor), and",
                  "Corr = D^-1/2 L L^T D^-1/2 with D = diag(L L^T); Sigma = diag(sd) Corr diag(sd)."))
stopifnot(corr_check$abs_diff < 1e-12)
## the general rule, checked against glmmTMB's own map for a 4 x 4 term
t6 <- c(0.5, -1, 2, 0.3, 0.1, -0.7)
L <- diag(4); k <- 1
for (i in 2:4) for (j in 1:(i - 1)) { L[i, j] <- t6[k]; k <- k + 1 }
C <- cov2cor(L %*% t(L))
stopifnot(max(abs(C[lower.tri(C)] - glmmTMB:::get_cor(t6))) < 1e-14)
corr_check$check_4x4 <- list(t = t6, corr_lower_tri_colmajor = C[lower.tri(C)])
results$sleepstudy$glmmTMB$corr_parameterisation_check <- corr_check
}

## ---- zero-inflation link check ----
if (!is.null(results$salamanders_zi)) {
zi <- results$salamanders_zi$tmb_fit
pz <- predict(zi, type = "zprob")
Xzi <- model.matrix(~ spp, zi$frame)
pz2 <- plogis(drop(Xzi %*% fixef(zi)$zi))
results$salamanders_zi$glmmTMB$zi_link_check <- list(
  link = "logit: P(structural zero) = plogis(X_zi %*% betazi); E[y] = (1 - p_zi) * mu_cond",
  max_abs_diff_vs_predict_zprob = max(abs(pz - pz2)))
stopifnot(max(abs(pz - pz2)) < 1e-12)
}

## ---- glmer.nb vs glmmTMB: the two Laplace approximations differ for nbinom2 (log link is not canonical) ----
## lme4's PIRLS uses the expected (Fisher) weights in the log-determinant, TMB the observed Hessian, so the
## two logLiks are different functions: evaluate each at the other's estimates.
if (!is.null(results$salamanders)) {
sf <- results$salamanders$tmb_fit; sg <- results$salamanders$lme4_fit
p <- sf$fit$par
p[names(p) == "beta"] <- fixef(sg)
p[names(p) == "betad"] <- log(getME(sg, "glmer.nb.theta"))
p[names(p) == "theta"] <- log(attr(VarCorr(sg)$site, "stddev"))
g_fixed <- glmer(specs$salamanders$formula, data = csv$salamanders,
                 family = MASS::negative.binomial(sigma(sf)), devFunOnly = TRUE)
results$salamanders$laplace_comparison <- list(
  glmmTMB_logLik_at_glmmTMB_est = -sf$fit$objective,
  glmmTMB_logLik_at_glmer.nb_est = -sf$obj$fn(p),
  lme4_logLik_at_glmer.nb_est = as.numeric(logLik(sg)),
  lme4_logLik_at_glmmTMB_est = -g_fixed(c(attr(VarCorr(sf)$cond$site, "stddev"), fixef(sf)$cond)) / 2,
  note = paste("glmer.nb's logLik is lme4's Laplace approximation (Fisher weights in the log-determinant);",
               "it is not the same function as glmmTMB's (observed Hessian), so the glmer.nb logLik is not a",
               "reference for a TMB-style Laplace fit. Each package's optimum is the best under its own function."))
invisible(sf$obj$fn(sf$fit$par))  # restore the object's last evaluated point
}

for (nm in names(results)) results[[nm]]$tmb_fit <- results[[nm]]$lme4_fit <- NULL

cmd <- sprintf("DATA=%s%s Rscript reference/r/glmmtmb_mixed.R", data_dir,
               if (partial) paste0(" SETS=", paste(sets, collapse = ",")) else "")
provenance <- list(
  R = R.version.string,
  lme4 = format(packageVersion("lme4")), glmmTMB = format(packageVersion("glmmTMB")),
  TMB = format(packageVersion("TMB")), Matrix = format(packageVersion("Matrix")),
  jsonlite = format(packageVersion("jsonlite")),
  platform = R.version$platform,
  date = format(Sys.time(), "%Y-%m-%d %H:%M:%S %Z"),
  command = cmd,
  data = paste("CSVs from reference/r/export_data.R (lme4 sleepstudy, Penicillin, grouseticks, cbpp, VerbAgg,",
               "InstEval; glmmTMB Salamanders)"),
  times = "wall seconds (system.time elapsed) of the first and second call in one R session; shared machine, indicative only",
  ranef_condsd = paste("glmmTMB condsd_sdreport = ranef(fit, condVar = TRUE) (TMB sdreport, includes uncertainty of",
                       "the fixed parameters); condsd_plugin = sqrt(diag(solve(H_uu))) at the estimate",
                       sprintf("(null when there are more than %d random effects: dense inverse too slow);",
                               max_dense_plugin),
                       "lme4 condsd = ranef(fit, condVar = TRUE) (plug-in, conditional on the estimates)"))
if (!partial || !file.exists(out_json)) {
  out <- c(list(provenance = provenance), results)
} else {
  ## partial run: keep the other entries as they are (jsonlite reads and writes this file byte-identically)
  out <- fromJSON(out_json, simplifyVector = TRUE, simplifyDataFrame = FALSE, simplifyMatrix = FALSE)
  for (nm in names(results)) out[[nm]] <- results[[nm]]
  upd <- provenance[c("R", "lme4", "glmmTMB", "TMB", "Matrix", "jsonlite", "platform", "date", "command")]
  upd$sets <- I(names(results))
  upd$ranef_condsd <- provenance$ranef_condsd
  out$provenance$updates <- c(out$provenance$updates, list(upd))
}
dir.create(dirname(out_json), showWarnings = FALSE, recursive = TRUE)
writeLines(toJSON(out, auto_unbox = TRUE, digits = NA, pretty = TRUE, null = "null", na = "null"), out_json)

## ---- human-readable table ----
fmt <- function(x) if (is.null(x)) "" else formatC(x, digits = 10, format = "g")
for (nm in names(results)) {
  r <- results[[nm]]
  cat(sprintf("\n==== %s: %s  [%s%s] ====\n", nm, r$formula, r$family,
              if (is.null(r$ziformula)) "" else paste(", zi", r$ziformula)))
  g <- r$glmmTMB; l <- r$lme4
  rows <- list()
  add <- function(label, a, b = NULL) rows[[length(rows) + 1]] <<- c(label, fmt(a), fmt(b))
  for (comp in names(g$fixed)) for (p in names(g$fixed[[comp]])) {
    lp <- if (comp == "cond" && !is.null(l)) l$fixed[[p]] else NULL
    add(paste0(if (comp == "zi") "zi:" else "", p), g$fixed[[comp]][[p]]$estimate, lp$estimate)
    add("   SE", g$fixed[[comp]][[p]]$se, lp$se)
  }
  for (gr in names(g$varcorr)) {
    for (tm in names(g$varcorr[[gr]]$sd))
      add(sprintf("SD %s:%s", gr, tm), g$varcorr[[gr]]$sd[[tm]], l$varcorr[[gr]]$sd[[tm]])
    for (cc in names(g$varcorr[[gr]]$correlation))
      add(sprintf("corr %s:%s", gr, cc), g$varcorr[[gr]]$correlation[[cc]], l$varcorr[[gr]]$correlation[[cc]])
  }
  if (!is.null(g$sigma)) add("sigma (residual SD)", g$sigma, l$sigma)
  if (!is.null(g$nbinom2_theta)) add("nbinom2 theta (size)", g$nbinom2_theta, l$nbinom2_theta)
  if (!is.null(g$zi_prob)) for (i in seq_along(g$zi_prob$p))
    add(sprintf("zi prob %s=%s", paste(g$zi_prob$by, collapse = ":"),
                paste(vapply(g$zi_prob$level, `[`, "", i), collapse = ":")), g$zi_prob$p[i])
  add("logLik", g$logLik, l$logLik)
  add("df", g$df, l$df)
  add("time 1st call (s)", g$time$first_call_s, l$time$first_call_s)
  add("time 2nd call (s)", g$time$second_call_s, l$time$second_call_s)
  tab <- do.call(rbind, rows)
  colnames(tab) <- c("", "glmmTMB", if (is.null(l)) "-" else l$call)
  print(noquote(tab), right = TRUE)
  cat("glmmTMB internal par (fit$fit$par) and SE:\n")
  ip <- g$internal_par
  print(noquote(cbind(name = ip$name, label = ip$label, estimate = fmt(ip$estimate), se = fmt(ip$se))))
  cat(sprintf("glmmTMB: convergence %d (%s), max|grad| %.2g, pdHess %s\n", g$convergence$code,
              g$convergence$message, g$convergence$max_abs_gradient, g$convergence$pdHess))
  if (length(g$warnings)) cat("glmmTMB warnings:", paste(g$warnings, collapse = " | "), "\n")
  if (!is.null(l) && length(l$warnings)) cat("lme4 warnings:", paste(l$warnings, collapse = " | "), "\n")
  cat(sprintf("CSV refit vs package data logLik difference: %g\n", r$csv_vs_package_logLik_diff))
}
if (!is.null(results$sleepstudy))
  cat("\nsleepstudy correlation parameter: t =", fmt(corr_check$theta[3]), " t/sqrt(1+t^2) =",
      fmt(corr_check$corr_from_theta3), " VarCorr corr =", fmt(corr_check$corr_VarCorr), "\n")
cat("wrote", out_json, "\n")
